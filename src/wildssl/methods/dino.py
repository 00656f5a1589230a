"""DINO (Caron et al. 2021): self-distillation from an EMA teacher with multi-crop, centering and
sharpening, over K weight-normalized prototypes (:mod:`wildssl.methods.distillation`).

``photometric``: the crops' colour pipelines (:func:`~wildssl.methods.distillation.multi_crop_specs`: ``dino``,
the paper's three, or one pipeline for every crop).
"""

from __future__ import annotations

import numpy as np
import torch

from wildssl.data.views import ViewBatch, make_views
from wildssl.methods.base import (AnnotationInput, AnnotationSpace, Method, StepContext, check_pool,
                                  normalized_embedding_std, pooled, pooled_features)
from wildssl.methods.distillation import (DISTILLATION_DEFAULTS, MULTI_CROP_VIEW_DEFAULTS, SelfDistillation,
                                          multi_crop_specs)
from wildssl.methods.koleo import KOLEO_DEFAULTS, KoLeoTerm


class DINO(Method):
    name = "dino"
    # koleo_*: DINOv2's KoLeo term on the student's pooled features of each global crop (methods/koleo.py; 0 = DINO)
    defaults = {**DISTILLATION_DEFAULTS, **MULTI_CROP_VIEW_DEFAULTS, "pool": "cls", **KOLEO_DEFAULTS}
    eval_network = "teacher"  # DINO reports its EMA teacher

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        check_pool(o["pool"])
        self.distillation = SelfDistillation(o)
        self._check_min_batch(config["train"]["batch_size"], self.distillation.min_batch())
        self.student["head"] = self.distillation.build_head(self.student["backbone"].embed_dim)
        self.make_teacher()
        self.specs = multi_crop_specs(o)
        self.n_global = len(self.specs) - o["n_local"]
        self.koleo = KoLeoTerm(o, config)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {**self.distillation.schedules(total_steps, steps_per_epoch), **self.koleo.schedules(total_steps)}

    def _logits(self, networks, views) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Head logits per crop, and the pooled features of all crops ``(V * B, width)``."""
        features = torch.cat(pooled_features(networks["backbone"], [v.images for v in views], self.options["pool"]))
        return list(networks["head"](features).chunk(len(views))), features

    def annotation_input(self) -> AnnotationInput:
        """The annotations are the K prototypes: psi_AB embeds them with its own (K, D) matrix."""
        return AnnotationInput(num_annotations=self.options["out_dim"])

    @torch.no_grad()
    def annotation_space(self, networks, images, annotation_batch, step) -> AnnotationSpace:
        """p(prototype | x): the distribution DINO's teacher gives, centered and sharpened."""
        logits = networks["head"](pooled(networks["backbone"](images), self.options["pool"]))
        return AnnotationSpace(self.distillation.centered_logits(logits, self.distillation.teacher_temp(step.values)))

    def step_views(self, batch: dict, generator: torch.Generator) -> list[ViewBatch]:
        """The step's crops, in :attr:`specs` order. With ``batch["partner_image"]`` ``(B, 3, S, S)`` (and
        ``"partner_aspect"``), the second global crop is cut from the partner image instead of the image
        itself (AdaSim's pair (t(x_i), t'(x_j*))); the random draws are the same either way, so a partner
        equal to the image gives exactly the standard views."""
        if "partner_image" not in batch:
            return make_views(batch["image"], self.specs, generator, aspect=batch["aspect"])
        # make_views draws spec group by spec group; the two global specs differ (their photometric
        # pipelines), so three calls consume the generator exactly as one call does.
        views = make_views(batch["image"], self.specs[:1], generator, aspect=batch["aspect"])
        views += make_views(batch["partner_image"], self.specs[1:2], generator, aspect=batch["partner_aspect"])
        if len(self.specs) > 2:
            views += make_views(batch["image"], self.specs[2:], generator, aspect=batch["aspect"])
        return views

    def loss_and_latents(self, batch: dict, step: StepContext) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The distillation loss, its metrics, and the teacher's pooled features of the first global crop
        ``(B, width)`` (detached): the latent of each image that AdaSim caches."""
        views = self.step_views(batch, step.generator)
        teacher_temp = self.distillation.teacher_temp(step.values)
        with torch.no_grad():
            teacher_logits, teacher_features = self._logits(self.teacher, views[: self.n_global])
            probs = self.distillation.targets(torch.cat(teacher_logits), teacher_temp)
        student_logits, student_features = self._logits(self.student, views)
        loss = self.distillation.loss(student_logits, probs.chunk(self.n_global))
        metrics = {**self.distillation.metrics(probs, teacher_temp),
                   "embedding_std": normalized_embedding_std(teacher_features)}
        batch = views[0].images.shape[0]
        # DINOv2: one KoLeo term per global crop, summed, on the student's (pooled) features
        loss = self.koleo.add(loss, metrics, student_features[: self.n_global * batch].split(batch), step.values)
        return loss, metrics, teacher_features[:batch]

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        loss, metrics, _ = self.loss_and_latents(batches["train"], step)
        return {"loss": loss, "metrics": metrics}
