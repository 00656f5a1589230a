"""SiLC (Naeem et al. 2023): CLIP plus DINO-style local-to-global self-distillation from an EMA teacher.

Each image gives two global and ``n_local`` local crops. The student's two global views are each
contrasted with the captions (the CLIP loss is their mean): SiLC aligns every view it distils with the
text, otherwise the two objectives pull the image tower apart. The EMA teacher (copies of the image
backbone and the DINO head) sees the global views; its DINO-head outputs, centered and sharpened, are
the targets of the student's DINO head on every crop (DINO's Eq. 2-3, :mod:`wildssl.losses.dino_loss`).
Loss = CLIP loss + ``distill_scale`` * distillation loss.

Views are crops and flips without colour jitter or grayscale: captions name colours, and a view whose
colours were changed would be paired with a caption that no longer describes it. SiLC keeps the teacher
momentum fixed (a teacher whose momentum reaches 1 stops following the image-text objective), so its
recipe sets ``ema.momentum_end`` equal to ``ema.momentum``.
"""

from __future__ import annotations

import numpy as np
import torch

from wildssl.data.views import CropSpec, make_views
from wildssl.methods.base import StepContext, pooled_features
from wildssl.methods.clip import CLIP
from wildssl.methods.distillation import DISTILLATION_DEFAULTS, MULTI_CROP_DEFAULTS, SelfDistillation

_NUM_GLOBAL = 2


class SiLC(CLIP):
    name = "silc"
    # CLIP's single view is replaced by the global crops: crop_size/crop_scale would be dead keys.
    defaults = {
        **{k: v for k, v in CLIP.defaults.items() if k not in ("crop_size", "crop_scale")},
        **DISTILLATION_DEFAULTS,
        **MULTI_CROP_DEFAULTS,
        "n_local": 8,  # main_dino.py's multi-crop defaults
        "global_scale": [0.4, 1.0],
        "local_scale": [0.05, 0.4],
        "distill_scale": 1.0,
    }
    eval_network = "teacher"  # the EMA image tower, as DINO

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        self.distillation = SelfDistillation(o)
        self.student["dino_head"] = self.distillation.build_head(self.student["backbone"].embed_dim)
        self.make_teacher(["backbone", "dino_head"])

    def view_specs(self) -> list[CropSpec]:
        o = self.options
        return ([CropSpec(o["global_size"], tuple(o["global_scale"]))] * _NUM_GLOBAL
                + [CropSpec(o["local_size"], tuple(o["local_scale"]))] * o["n_local"])

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return self.distillation.schedules(total_steps, steps_per_epoch)

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        o = self.options
        batch = batches["train"]
        views = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        images = [v.images for v in views]
        features = pooled_features(self.student["backbone"], images, o["pool"])
        clip_part, metrics = self.contrastive(features[:_NUM_GLOBAL], batch["caption"])

        teacher_temp = self.distillation.teacher_temp(step.values)
        with torch.no_grad():
            teacher_features = pooled_features(self.teacher["backbone"], images[:_NUM_GLOBAL], o["pool"])
            probs = self.distillation.targets(self.teacher["dino_head"](torch.cat(teacher_features)), teacher_temp)
        student_logits = self.student["dino_head"](torch.cat(features)).chunk(len(views))
        distill_part = self.distillation.loss(student_logits, probs.chunk(_NUM_GLOBAL))

        metrics.update(clip_loss=clip_part.detach(), distill_loss=distill_part.detach(),
                       **self.distillation.metrics(probs, teacher_temp))
        metrics.pop("uniform_loss")  # the total loss holds the CLIP part: it is no uniform-collapse measure
        return {"loss": clip_part + o["distill_scale"] * distill_part, "metrics": metrics}
