"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

One view per image (RandomResizedCrop (0.2, 1) + flip, no colour augmentation); 75% of its patches,
drawn per image, are hidden. The encoder runs on the visible patches only: every image keeps the same
number ``K`` of patches, so the encoder's input is ``(B, 1 + K, D)`` with no padding and never sees a
hidden patch. The light decoder (:class:`~wildssl.models.mae_decoder.MAEDecoder`) puts a mask token at
every hidden position and predicts every patch's pixels; the loss
(:func:`~wildssl.losses.mae_loss.mae_loss`) is the MSE on the hidden patches against per-patch
normalized pixels.

Position embeddings are fixed 2-D sine-cosine tables, in the encoder (its table is overwritten and
frozen here) and in the decoder, as in the paper (Sec. A.1). Evaluation reads the student encoder
(there is no teacher).
"""

from __future__ import annotations

import torch

from wildssl.data.masking import cpu_generator, random_masking
from wildssl.data.views import CropSpec, make_views
from wildssl.errors import ConfigError
from wildssl.losses.mae_loss import mae_loss, patchify
from wildssl.methods.base import Method, StepContext
from wildssl.models.mae_decoder import MAEDecoder
from wildssl.models.position import freeze_sincos_positions


class MAE(Method):
    """Masked autoencoder: ``student = {backbone, decoder}``; no teacher.

    Config keys (``method.*``): ``crop_size`` (pixels of the one view), ``crop_scale`` (its
    RandomResizedCrop area range; flip 0.5, no colour), ``mask_ratio`` (fraction of patches hidden per
    image), ``norm_pix_loss`` (targets normalized per patch), ``decoder_dim`` / ``decoder_depth`` /
    ``decoder_heads`` (the decoder transformer).
    """

    name = "mae"
    defaults = {
        "crop_size": 224,
        "crop_scale": [0.2, 1.0],
        "mask_ratio": 0.75,
        "norm_pix_loss": True,
        "decoder_dim": 512,
        "decoder_depth": 8,
        "decoder_heads": 16,
    }
    eval_network = "student"

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        if not 0.0 < o["mask_ratio"] < 1.0:
            raise ConfigError(f"method.mask_ratio={o['mask_ratio']} must be in (0, 1) (MAE: 0.75)")
        backbone = self.student["backbone"]
        self.patch_size = backbone.patch_size
        self.grid = backbone.patch_grid(o["crop_size"], o["crop_size"])
        freeze_sincos_positions(backbone)
        self.student["decoder"] = MAEDecoder(backbone.embed_dim, self.grid, self.patch_size, backbone.in_chans,
                                             o["decoder_dim"], o["decoder_depth"], o["decoder_heads"],
                                             num_prefix_tokens=backbone.num_prefix_tokens)
        self.specs = [CropSpec(o["crop_size"], tuple(o["crop_scale"]), photometric=None)]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def draw_masks(self, batch: int, generator: torch.Generator, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep`` ``(B, K)`` long and ``mask`` ``(B, N)`` bool (True = hidden), on ``device``."""
        keep, mask = random_masking(batch, self.num_patches, self.options["mask_ratio"], cpu_generator(generator))
        return keep.to(device), mask.to(device)

    def predict_pixels(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Normalized images ``(B, 3, H, W)`` and the visible patches ``keep`` ``(B, K)`` -> the decoder's
        pixels ``(B, N, p * p * 3)`` of every patch. The encoder sees only the ``K`` kept patches."""
        tokens = self.student["backbone"].forward_features(images, keep_indices=keep)
        return self.student["decoder"](tokens, keep)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """For pictures: masks drawn from ``generator`` and the predicted patches of ``images``
        ``(B, 3, H, W)`` (normalized). Returns ``mask`` ``(B, N)`` and predictions ``(B, N, p * p * 3)``
        (per-patch normalized pixels when ``norm_pix_loss``)."""
        keep, mask = self.draw_masks(images.shape[0], generator, images.device)
        return mask, self.predict_pixels(images, keep)

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]
        (view,) = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        keep, mask = self.draw_masks(view.images.shape[0], step.generator, view.images.device)
        predictions = self.predict_pixels(view.images, keep)
        loss = mae_loss(predictions, patchify(view.images, self.patch_size), mask, self.options["norm_pix_loss"])
        return {"loss": loss, "metrics": {}}
