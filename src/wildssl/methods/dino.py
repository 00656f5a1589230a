"""DINO (Caron et al. 2021): self-distillation from an EMA teacher with multi-crop, centering and
sharpening, over K weight-normalized prototypes."""

from __future__ import annotations

import math

import numpy as np
import torch

from wildssl.data.views import dino_specs, make_views
from wildssl.losses.dino_loss import (DINOCenter, dino_cross_entropy, entropy, teacher_probabilities,
                                      teacher_temperature_schedule)
from wildssl.methods.base import (AnnotationSpace, Method, StepContext, normalized_embedding_std, pooled,
                                  pooled_features)
from wildssl.models.heads import DINOHead


# The keys of DINO-style self-distillation (head, multi-crop, temperatures, centering), shared by DINO and
# SiLC: the released ViT-S/16 settings (10 local crops, scales split at 0.25).
DISTILLATION_DEFAULTS = {
    "out_dim": 65536,
    "hidden_dim": 2048,
    "bottleneck_dim": 256,
    "head_layers": 3,
    "norm_last_layer": True,
    "global_size": 224,
    "local_size": 96,
    "n_local": 10,
    "global_scale": [0.25, 1.0],
    "local_scale": [0.05, 0.25],
    "student_temp": 0.1,
    "teacher_temp": 0.07,
    "warmup_teacher_temp": 0.04,
    "teacher_temp_warmup_epochs": 30.0,
    "center_momentum": 0.9,
}


def teacher_temp_schedule(options: dict, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """``{"teacher_temp": per-step values}``: linear warm-up, then constant (DINO's schedule)."""
    # A run shorter than the warm-up (a smoke test with train.steps=2) warms up over the whole run.
    warmup = min(int(round(options["teacher_temp_warmup_epochs"] * steps_per_epoch)), total_steps)
    return {"teacher_temp": np.asarray(teacher_temperature_schedule(
        options["warmup_teacher_temp"], options["teacher_temp"], warmup, total_steps), dtype=np.float64)}


class DINO(Method):
    name = "dino"
    defaults = {**DISTILLATION_DEFAULTS, "pool": "cls"}

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        width = self.student["backbone"].embed_dim
        self.student["head"] = DINOHead(width, o["out_dim"], o["hidden_dim"], o["bottleneck_dim"],
                                        o["head_layers"], o["norm_last_layer"])
        self.make_teacher()
        self.center = DINOCenter(o["out_dim"])
        self.specs = dino_specs(o["global_size"], o["local_size"], o["n_local"],
                                global_scale=tuple(o["global_scale"]), local_scale=tuple(o["local_scale"]))
        self.n_global = len(self.specs) - o["n_local"]

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return teacher_temp_schedule(self.options, total_steps, steps_per_epoch)

    def _logits(self, networks, views) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Head logits per crop, and the pooled features of all crops ``(V * B, width)``."""
        features = torch.cat(pooled_features(networks["backbone"], [v.images for v in views], self.options["pool"]))
        return list(networks["head"](features).chunk(len(views))), features

    def annotation_dim(self) -> int:
        return self.options["bottleneck_dim"]

    @torch.no_grad()
    def annotation_space(self, networks, images, annotation_batch, step) -> AnnotationSpace:
        """Annotations are the K prototypes; p(l|x) is the teacher's distribution: centered, sharpened."""
        logits = networks["head"](pooled(networks["backbone"](images), self.options["pool"])).float()
        probs_logits = (logits - self.center.center) / step.values["teacher_temp"]
        return AnnotationSpace(probs_logits, networks["head"].prototypes().detach().float())

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]
        views = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        teacher_temp = step.values["teacher_temp"]
        with torch.no_grad():
            teacher_logits, teacher_features = self._logits(self.teacher, views[: self.n_global])
            stacked = torch.cat(teacher_logits).float()
            probs = teacher_probabilities(stacked, self.center.center, teacher_temp)
            teacher_probs = list(probs.chunk(self.n_global))
        student_logits, _ = self._logits(self.student, views)
        loss = dino_cross_entropy([s.float() for s in student_logits], teacher_probs,
                                  self.options["student_temp"])
        self.center.update(stacked, self.options["center_momentum"])
        return {"loss": loss, "metrics": {
            "teacher_entropy": entropy(probs).mean(),
            "uniform_loss": math.log(self.options["out_dim"]),
            "embedding_std": normalized_embedding_std(teacher_features),
            "teacher_temp": teacher_temp,
        }}
