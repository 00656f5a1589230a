"""SimCLR (Chen et al. 2020): two augmented views, an MLP projection, NT-Xent over the global batch.

``photometric`` names the views' colour pipeline (:data:`wildssl.data.photometric.PIPELINES`): ``simclr``
(the paper's ImageNet setting, colour strength 1 and blur) or ``simclr_cifar`` (its CIFAR-10 setting,
strength 0.5 and no blur, for small images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.data.photometric import check_pipeline
from wildssl.data.views import CropSpec, make_views, preprocess_images
from wildssl.losses.nt_xent import nt_xent_loss
from wildssl.methods.base import (AnnotationInput, AnnotationSpace, Method, StepContext, check_pool,
                                  normalized_embedding_std, pooled)
from wildssl.models.heads import ProjectionHead


class SimCLR(Method):
    name = "simclr"
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

    # -- annotation bootstrapping: the annotations are the other images of the annotation batch ----------
    def annotation_images(self, annotation_batch: dict) -> torch.Tensor:
        """The annotation batch's images, whole, resized to the crop size and normalized: ``(K, 3, s, s)``."""
        return preprocess_images(annotation_batch["image"], self.options["crop_size"])

    def annotation_input(self) -> AnnotationInput:
        return AnnotationInput(feature_dim=self.student["backbone"].embed_dim)

    def annotation_features(self, networks: nn.ModuleDict, annotation_batch: dict,
                            step: StepContext | None = None) -> torch.Tensor:
        """Pooled backbone features ``(K, width)`` of the annotation images (psi_AB's input, with gradient)."""
        return pooled(networks["backbone"](self.annotation_images(annotation_batch)), self.options["pool"])

    @torch.no_grad()
    def annotation_space(self, networks, images, annotation_batch, step) -> AnnotationSpace:
        """p(l|x) = softmax(cos(z_x, z_l) / temperature) over the annotation images l, with the projections
        z of ``networks``."""
        z_others = F.normalize(self.embed(self.annotation_images(annotation_batch), networks).float(), dim=-1)
        z_images = F.normalize(self.embed(images, networks).float(), dim=-1)
        return AnnotationSpace(z_images @ z_others.T / self.options["temperature"])

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]
        view_a, view_b = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        z = self.embed(torch.cat([view_a.images, view_b.images]))
        z_a, z_b = z.chunk(2)
        loss, accuracy = nt_xent_loss(z_a, z_b, self.options["temperature"], return_accuracy=True)
        return {"loss": loss, "metrics": {"contrastive_acc": accuracy,
                                          "embedding_std": normalized_embedding_std(z_a)}}
