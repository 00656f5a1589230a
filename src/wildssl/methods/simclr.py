"""SimCLR (Chen et al. 2020): two augmented views, an MLP projection, NT-Xent over the global batch."""

from __future__ import annotations

import torch

from wildssl.data.views import CropSpec, make_views
from wildssl.losses.nt_xent import nt_xent_loss
from wildssl.methods.base import Method, StepContext, normalized_embedding_std, pooled
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
    }

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        width = self.student["backbone"].embed_dim
        self.student["head"] = ProjectionHead(width, o["proj_hidden_dim"], o["proj_dim"], o["proj_layers"])
        self.specs = [CropSpec(o["crop_size"], tuple(o["crop_scale"]), photometric="simclr")] * 2

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized views -> (B, proj_dim) projections z."""
        return self.student["head"](pooled(self.student["backbone"](images), self.options["pool"]))

    def annotation_space(self, images: torch.Tensor, other_views: torch.Tensor):
        """phi = projection of ``images``; psi = projections of other images' views; scale = 1/tau."""
        return self.embed(images), self.embed(other_views), 1.0 / self.options["temperature"]

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]
        view_a, view_b = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        z = self.embed(torch.cat([view_a.images, view_b.images]))
        z_a, z_b = z.chunk(2)
        loss, accuracy = nt_xent_loss(z_a, z_b, self.options["temperature"], return_accuracy=True)
        return {"loss": loss, "metrics": {"contrastive_acc": accuracy,
                                          "embedding_std": normalized_embedding_std(z_a)}}
