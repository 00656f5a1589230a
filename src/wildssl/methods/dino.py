"""DINO (Caron et al. 2021): self-distillation from an EMA teacher with multi-crop, centering and
sharpening, over K weight-normalized prototypes (:mod:`wildssl.methods.distillation`).

``photometric``: ``dino`` (the paper's three colour pipelines: blur p = 1 / 0.1 + solarize / 0.5 on the
first global, second global and local crops) or the name of one pipeline of
:data:`wildssl.data.photometric.PIPELINES` for every crop (``simclr_cifar``: colour jitter and grayscale,
no blur, for 32-px images).
"""

from __future__ import annotations

import numpy as np
import torch

from wildssl.data.photometric import PIPELINES
from wildssl.data.views import dino_specs, make_views
from wildssl.errors import ConfigError
from wildssl.methods.base import (AnnotationSpace, Method, StepContext, check_pool, normalized_embedding_std,
                                  pooled, pooled_features)
from wildssl.methods.distillation import DISTILLATION_DEFAULTS, MULTI_CROP_DEFAULTS, SelfDistillation


class DINO(Method):
    name = "dino"
    defaults = {**DISTILLATION_DEFAULTS, **MULTI_CROP_DEFAULTS, "pool": "cls", "photometric": "dino"}
    eval_network = "teacher"  # DINO reports its EMA teacher

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        check_pool(o["pool"])
        self.distillation = SelfDistillation(o)
        self.student["head"] = self.distillation.build_head(self.student["backbone"].embed_dim)
        self.make_teacher()
        if o["photometric"] != "dino" and o["photometric"] not in PIPELINES:
            raise ConfigError(f"method.photometric={o['photometric']!r} is not a photometric pipeline; choose dino "
                              f"(the paper's three) or one of {', '.join(sorted(PIPELINES))} for every crop")
        photometric = None if o["photometric"] == "dino" else o["photometric"]
        self.specs = dino_specs(o["global_size"], o["local_size"], o["n_local"],
                                global_scale=tuple(o["global_scale"]), local_scale=tuple(o["local_scale"]),
                                photometric=photometric)
        self.n_global = len(self.specs) - o["n_local"]

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return self.distillation.schedules(total_steps, steps_per_epoch)

    def _logits(self, networks, views) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Head logits per crop, and the pooled features of all crops ``(V * B, width)``."""
        features = torch.cat(pooled_features(networks["backbone"], [v.images for v in views], self.options["pool"]))
        return list(networks["head"](features).chunk(len(views))), features

    def annotation_dim(self) -> int:
        return self.options["bottleneck_dim"]

    @torch.no_grad()
    def annotation_space(self, networks, images, annotation_batch, step) -> AnnotationSpace:
        """Annotations are the K prototypes; p(l|x) is the teacher's distribution: centered, sharpened."""
        logits = networks["head"](pooled(networks["backbone"](images), self.options["pool"]))
        centered = self.distillation.centered_logits(logits, self.distillation.teacher_temp(step.values))
        return AnnotationSpace(centered, networks["head"].prototypes().detach().float())

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]
        views = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        teacher_temp = self.distillation.teacher_temp(step.values)
        with torch.no_grad():
            teacher_logits, teacher_features = self._logits(self.teacher, views[: self.n_global])
            probs = self.distillation.targets(torch.cat(teacher_logits), teacher_temp)
        student_logits, _ = self._logits(self.student, views)
        loss = self.distillation.loss(student_logits, probs.chunk(self.n_global))
        return {"loss": loss, "metrics": {**self.distillation.metrics(probs, teacher_temp),
                                          "embedding_std": normalized_embedding_std(teacher_features)}}
