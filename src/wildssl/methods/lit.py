"""LiT (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022): a trained image
encoder is locked and a text tower learns to map captions into its embedding space with the CLIP loss.
MAWS (Singh et al. 2023, Sec. 4) adds zero-shot classification to its WSP encoders this way.

The image tower is ``model.init_from`` (an MAE, WSP, CLIP, ... run or export), frozen and in eval mode
(:attr:`Method.frozen_modules`): its weights never change, so every tensor of it is bit-identical after
training. The image embedding is a trainable linear head on its pooled feature (``method.image_head``,
CLIP's head; a locked tower trained elsewhere has none that fits the text space), or, without it, the
pooled feature itself (LiT's purest form; the text tower then projects to the encoder's width).

Images: one view, CLIP's RandomResizedCrop (0.9, 1), or, with ``method.cache_features``, the whole image
resized to ``crop_size`` so that the features of an image are a fixed function of its index: they are then
computed once and kept (on the CPU, ``(dataset size, width)`` at most), LiT's "pre-computed image
embeddings". Everything else (tokenizer, text tower, loss, logit scale) is CLIP's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from wildssl.data.views import crops_at_boxes, make_views
from wildssl.errors import ConfigError
from wildssl.methods.base import StepContext, pooled
from wildssl.methods.clip import CLIP
from wildssl.models.loading import build_encoder_from_config


def _encoder_width(model_config: dict) -> int:
    with torch.device("meta"):  # the width alone: no memory
        return build_encoder_from_config(model_config).embed_dim


class LiT(CLIP):
    """Locked-image text tuning: ``student = {backbone (frozen), image_proj, text, logit_scale}``.

    Config keys beyond CLIP's: ``image_head`` (true: a trainable linear projection of the locked features to
    ``embed_dim``, CLIP's image head; false: the locked feature itself is the image embedding, LiT's pure
    form, and the text tower projects to the encoder's width), ``embed_dim`` (null: the encoder's width),
    ``cache_features`` (see the module docstring)."""

    locks_encoder = True  # the evaluated encoder is model.init_from's, unchanged by training

    name = "lit"
    defaults = CLIP.defaults | {"embed_dim": None, "image_head": True, "cache_features": False}
    frozen_modules = ("backbone",)

    def __init__(self, config: dict):
        if not config["model"].get("init_from"):
            raise ConfigError("method lit locks a trained image encoder: set model.init_from to a run directory, "
                              "checkpoint or export (e.g. a wsp or mae run)")
        width = _encoder_width(config["model"])
        o = config["method"]
        if not o["image_head"] and o["embed_dim"] not in (None, width):
            raise ConfigError(f"method.embed_dim={o['embed_dim']} needs method.image_head=true: without an image head "
                              f"the embedding is the locked encoder's own feature, of width {width} (set it null)")
        config = copy.deepcopy(config)  # the method's copy: the run's config keeps embed_dim as the user wrote it
        config["method"]["embed_dim"] = o["embed_dim"] or width
        super().__init__(config)
        if not o["image_head"]:
            self.student["image_proj"] = nn.Identity()
        self.freeze_modules()
        self.student["backbone"].eval()
        self._cache: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def image_features(self, batch: dict, step: StepContext) -> torch.Tensor:
        """Pooled features ``(B, width)`` of the locked encoder, without gradient (from the cache when on)."""
        backbone = self.student["backbone"]
        if not self.options["cache_features"]:
            (view,) = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
            return pooled(backbone(view.images), self.options["pool"])
        indices = batch["index"].tolist()
        missing = [position for position, index in enumerate(indices) if index not in self._cache]
        if missing:
            images = batch["image"][missing]
            whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=images.device).expand(len(missing), 1, 4)
            views = crops_at_boxes(images, whole, self.options["crop_size"], step.generator)
            features = pooled(backbone(views), self.options["pool"]).float().cpu()
            # A pure function of the frozen weights and the image: safe to keep even if this step is discarded.
            for position, feature in zip(missing, features):
                self._cache[indices[position]] = feature
        device = batch["image"].device
        return torch.stack([self._cache[index] for index in indices]).to(device, non_blocking=True)

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]
        loss, metrics = self.contrastive([self.image_features(batch, step)], batch["caption"])
        return {"loss": loss, "metrics": metrics}
