"""SimSiam (Chen & He, CVPR 2021): two views through one encoder and projector, a predictor on top, and a
symmetrized negative cosine where the target branch is a stop-gradient (:mod:`wildssl.losses.simsiam_loss`).

No EMA teacher, no negatives, no large batch: the stop-gradient alone prevents collapse. The projector is a
3-layer MLP with BatchNorm on every layer, its output included; the predictor a 2-layer bottleneck MLP
(BatchNorm on the hidden layer only). Each view goes through the heads on its own, so BatchNorm sees the
statistics of one view batch at a time, as in the paper; under DDP the statistics are per rank.
"""

from __future__ import annotations

import numpy as np
import torch

from wildssl.data.views import CropSpec, ViewBatch, make_views
from wildssl.losses.simsiam_loss import simsiam_loss
from wildssl.methods.base import Method, StepContext, check_pool, normalized_embedding_std, pooled
from wildssl.methods.koleo import KOLEO_DEFAULTS, KoLeoTerm
from wildssl.models.heads import ProjectionHead


class SimSiam(Method):
    name = "simsiam"
    min_batch = (2, True, "normalizes its projector's and predictor's BatchNorm over a rank's images of one view")
    defaults = {
        "crop_size": 224,
        "crop_scale": [0.2, 1.0],
        "photometric": "simsiam",
        "proj_hidden_dim": 2048,
        "proj_dim": 2048,
        "proj_layers": 3,
        "pred_hidden_dim": 512,
        "pool": "cls",
        **KOLEO_DEFAULTS,  # DINOv2's KoLeo term on the backbone's pooled features of each view (0 = SimSiam)
    }

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        check_pool(o["pool"])
        width = self.student["backbone"].embed_dim
        self.student["projector"] = ProjectionHead(width, o["proj_hidden_dim"], o["proj_dim"], o["proj_layers"],
                                                   output_norm=True)
        self.student["predictor"] = ProjectionHead(o["proj_dim"], o["pred_hidden_dim"], o["proj_dim"], 2)
        self.spec = CropSpec(o["crop_size"], tuple(o["crop_scale"]), photometric=o["photometric"])
        self.koleo = KoLeoTerm(o, config)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return self.koleo.schedules(total_steps)

    def step_views(self, batch: dict, generator: torch.Generator) -> tuple[ViewBatch, ViewBatch]:
        """The two views t(x_i), t'(x_i); with ``batch["partner_image"]`` (and ``"partner_aspect"``) the
        second is cut from the partner image (AdaSim's t'(x_j*)). Both views are one ``make_views`` call
        on the images stacked with their partners (the images themselves when there is none), so the
        random draws do not depend on whether a partner is given."""
        partner = batch.get("partner_image", batch["image"])
        partner_aspect = batch.get("partner_aspect", batch["aspect"])
        (views,) = make_views(torch.cat([batch["image"], partner]), [self.spec], generator,
                              aspect=torch.cat([batch["aspect"], partner_aspect]))
        size = batch["image"].shape[0]
        return (ViewBatch(views.images[:size], views.boxes[:size], views.flipped[:size], views.source_index[:size]),
                ViewBatch(views.images[size:], views.boxes[size:], views.flipped[size:], views.source_index[size:]))

    def loss_and_latents(self, batch: dict, step: StepContext) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The SimSiam loss, its metrics, and the pooled backbone features of the first view ``(B, width)``
        (detached): the latent of each image that AdaSim caches."""
        view_a, view_b = self.step_views(batch, step.generator)
        features = pooled(self.student["backbone"](torch.cat([view_a.images, view_b.images])), self.options["pool"])
        features_a, features_b = features.chunk(2)
        z_a, z_b = self.student["projector"](features_a), self.student["projector"](features_b)
        p_a, p_b = self.student["predictor"](z_a), self.student["predictor"](z_b)
        # The paper's collapse indicator (Fig. 2): the std of l2-normalized z, here times sqrt(D).
        metrics = {"embedding_std": normalized_embedding_std(z_a)}
        loss = self.koleo.add(simsiam_loss(p_a, p_b, z_a, z_b), metrics, [features_a, features_b], step.values)
        return loss, metrics, features_a.detach()

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        loss, metrics, _ = self.loss_and_latents(batches["train"], step)
        return {"loss": loss, "metrics": metrics}
