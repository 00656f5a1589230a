"""SimCLR (Chen et al. 2020): two augmented views, an MLP projection, NT-Xent over the global batch.

``photometric`` names the views' colour pipeline (:data:`wildssl.data.photometric.PIPELINES`): ``simclr``
(the paper's ImageNet setting, colour strength 1 and blur) or ``simclr_cifar`` (its CIFAR-10 setting,
strength 0.5 and no blur, for small images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.data.photometric import check_pipeline
from wildssl.data.views import CropSpec, ViewBatch, make_views
from wildssl.losses.nt_xent import nt_xent_loss
from wildssl.methods.base import (AnnotationInput, AnnotationSpace, Method, StepContext, check_pool,
                                  normalized_embedding_std, pooled)
from wildssl.models.heads import ProjectionHead


class SimCLR(Method):
    name = "simclr"
    # NT-Xent: the other images of the (gathered) batch are the negatives; with one image the loss is 0
    min_batch = (2, False, "contrasts each image with the other images of the batch")
    defaults = {
        "crop_size": 224,
        "crop_scale": [0.08, 1.0],
        "temperature": 0.1,
        "proj_hidden_dim": 2048,
        "proj_dim": 128,
        "proj_layers": 2,
        "pool": "cls",
        "photometric": "simclr",
    }

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        check_pool(o["pool"])
        check_pipeline(o["photometric"], "method.photometric")
        width = self.student["backbone"].embed_dim
        self.student["head"] = ProjectionHead(width, o["proj_hidden_dim"], o["proj_dim"], o["proj_layers"])
        self.specs = [CropSpec(o["crop_size"], tuple(o["crop_scale"]), photometric=o["photometric"])] * 2

    def embed(self, images: torch.Tensor, networks: nn.ModuleDict | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalized views -> (B, proj_dim) projections z (of the student by default)."""
        networks = self.student if networks is None else networks
        return networks["head"](pooled(networks["backbone"](images), self.options["pool"]))

    # -- the step's views, drawn and encoded once ------------------------------------------------------
    def views(self, batch: dict, step: StepContext) -> list[ViewBatch]:
        """The step's two augmented views of ``batch``, drawn once per step (kept in ``step.memo``): SimCLR's
        loss and annotation bootstrapping's annotations read the same views."""
        return step.remember("simclr_views", batch,
                             lambda: make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"]))

    def view_features(self, batch: dict, step: StepContext, indices: Sequence[int] = (0, 1)) -> list[torch.Tensor]:
        """The student's pooled backbone features ``(B, width)`` of the step's views ``indices``, with gradient.
        Each view goes through the backbone once per step (``step.memo``): SimCLR's loss and annotation
        bootstrapping's psi_AB read the same pass of the second view, and its gradient sums both uses, as two
        passes would."""
        features = step.remember("simclr_view_features", batch, dict)  # view index -> features
        missing = [index for index in indices if index not in features]
        if missing:
            views = self.views(batch, step)
            images = torch.cat([views[index].images for index in missing])
            pooled_features = pooled(self.student["backbone"](images), self.options["pool"])
            features.update(zip(missing, pooled_features.chunk(len(missing))))
        return [features[index] for index in indices]

    # -- annotation bootstrapping: the annotations are the other images' views (the second view of each) --
    def annotation_images(self, annotation_batch: dict, step: StepContext) -> torch.Tensor:
        """The second of the step's SimCLR views of the annotation batch ``(K, 3, s, s)``: the view that
        SimCLR's loss classifies each first view against."""
        return self.views(annotation_batch, step)[1].images

    def annotation_input(self) -> AnnotationInput:
        return AnnotationInput(feature_dim=self.student["backbone"].embed_dim)

    def annotation_features(self, networks: nn.ModuleDict, annotation_batch: dict,
                            step: StepContext | None = None) -> torch.Tensor:
        """Pooled backbone features ``(K, width)`` of the annotation images (psi_AB's input, with gradient);
        the student's are the pass that SimCLR's loss reads too (:meth:`view_features`)."""
        if step is None:
            raise ValueError("SimCLR's annotations are the step's views: annotation_features needs the step")
        if networks is self.student:
            return self.view_features(annotation_batch, step, (1,))[0]
        return pooled(networks["backbone"](self.annotation_images(annotation_batch, step)), self.options["pool"])

    @torch.no_grad()
    def annotation_space(self, networks, images, annotation_batch, step) -> AnnotationSpace:
        """p(l|x) = softmax(cos(z_x, z_l) / temperature) over the annotations l (the second views of the
        annotation images), with the projections z of ``networks``."""
        z_others = F.normalize(self.embed(self.annotation_images(annotation_batch, step), networks).float(), dim=-1)
        z_images = F.normalize(self.embed(images, networks).float(), dim=-1)
        return AnnotationSpace(z_images @ z_others.T / self.options["temperature"])

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        # One head call on both views, so that the head's BatchNorm normalizes them together.
        z_a, z_b = self.student["head"](torch.cat(self.view_features(batches["train"], step))).chunk(2)
        loss, accuracy = nt_xent_loss(z_a, z_b, self.options["temperature"], return_accuracy=True)
        return {"loss": loss, "metrics": {"contrastive_acc": accuracy,
                                          "embedding_std": normalized_embedding_std(z_a)}}
