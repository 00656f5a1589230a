"""SLIP (Mu et al. 2021): CLIP plus SimCLR on the image tower.

Each image gives CLIP's view (RandomResizedCrop scale (0.5, 1) as in SLIP) and two SimCLR views
(scale (0.08, 1), flip, colour jitter, grayscale, blur: the ``ssl_photometric`` pipeline, SimCLR's
``simclr`` by default or ``simclr_cifar`` for small images); all three go through the backbone in one call.
The SimCLR views pass a 3-layer MLP (hidden 4096, out 256, BatchNorm) into NT-Xent at temperature 0.1.
Loss = CLIP loss + ``ssl_scale`` * NT-Xent (SLIP's Eq. 3).
"""

from __future__ import annotations

from wildssl.data.photometric import check_pipeline
from wildssl.data.views import CropSpec, make_views
from wildssl.losses.nt_xent import nt_xent_loss
from wildssl.methods.base import StepContext, pooled_features
from wildssl.methods.clip import CLIP
from wildssl.models.heads import ProjectionHead


class SLIP(CLIP):
    name = "slip"
    defaults = {
        **CLIP.defaults,
        "crop_scale": [0.5, 1.0],
        "ssl_crop_scale": [0.08, 1.0],
        "ssl_hidden_dim": 4096,
        "ssl_dim": 256,
        "ssl_layers": 3,
        "ssl_temperature": 0.1,
        "ssl_scale": 1.0,
        "ssl_photometric": "simclr",  # the SimCLR views' colour pipeline, as SimCLR's method.photometric
    }

    def __init__(self, config: dict):
        check_pipeline(config["method"]["ssl_photometric"], "method.ssl_photometric")  # before CLIP builds the views
        super().__init__(config)
        o = self.options
        width = self.student["backbone"].embed_dim
        self.student["ssl_head"] = ProjectionHead(width, o["ssl_hidden_dim"], o["ssl_dim"], o["ssl_layers"])

    def view_specs(self) -> list[CropSpec]:
        o = self.options
        simclr = CropSpec(o["crop_size"], tuple(o["ssl_crop_scale"]), photometric=o["ssl_photometric"])
        return super().view_specs() + [simclr, simclr]

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]
        views = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        clip_features, *ssl_features = pooled_features(self.student["backbone"], [v.images for v in views],
                                                       self.options["pool"])
        clip_part, metrics = self.contrastive([clip_features], batch["caption"])
        # One head call per view, as SLIP's own code (models.py: image_mlp(h1), image_mlp(h2)): each view's
        # BatchNorm statistics are its own.
        z_a, z_b = (self.student["ssl_head"](features) for features in ssl_features)
        ssl_part, ssl_acc = nt_xent_loss(z_a, z_b, self.options["ssl_temperature"], return_accuracy=True)
        metrics.update(clip_loss=clip_part.detach(), ssl_loss=ssl_part.detach(), ssl_acc=ssl_acc)
        return {"loss": clip_part + self.options["ssl_scale"] * ssl_part, "metrics": metrics}
