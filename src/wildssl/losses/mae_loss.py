"""MAE's reconstruction loss (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
Sec. 3 "Reconstruction target"): mean squared error between predicted and true pixels, computed on
the masked patches only, against per-patch normalized pixels by default (``norm_pix_loss``).

Patches are flattened in ``(row, col, channel)`` order inside each patch, and patch ``(i, j)`` of an
``(h, w)`` grid is row ``i * w + j``: the encoder's token order. The functions are pure; the method
(:mod:`wildssl.methods.mae`) owns the masking and the networks.
"""

from __future__ import annotations

import torch

from wildssl.errors import ConfigError

NORM_PIX_EPS = 1e-6  # added to the per-patch variance, as in the released MAE code


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, h * w, p * p * C)`` with ``h = H / p``, ``w = W / p``; each row holds one
    patch's pixels in ``(row, col, channel)`` order."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ConfigError(f"images of {height}x{width} pixels do not split into {patch_size}-pixel patches")
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, h * w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, h * w, p * p * C) -> (B, C, h * p, w * p)``."""
    batch = patches.shape[0]
    h, w = grid
    x = patches.reshape(batch, h, w, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, h * patch_size, w * patch_size)


def normalized_pixel_targets(patches: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """``norm_pix_loss`` targets: each patch ``(..., P)`` minus its mean, divided by
    ``sqrt(var + eps)`` with the unbiased variance over its ``P`` values (the released code's
    ``Tensor.var``). Computed in float32 at least."""
    x = _at_least_fp32(patches)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=True)
    return (x - mean) / torch.sqrt(var + eps)


def mae_loss(predictions: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor,
             norm_pix: bool = True) -> torch.Tensor:
    """Mean over the masked patches of the per-patch mean squared error.

    ``predictions`` ``(B, N, P)`` (the decoder's pixels per patch), ``patches`` ``(B, N, P)`` (the true
    pixels, :func:`patchify`), ``mask`` ``(B, N)`` bool, True where a patch was hidden from the encoder.
    Loss = ``sum_{b,n} mask[b,n] * mean_P (pred - target)^2 / sum mask`` with target the per-patch
    normalized pixels when ``norm_pix`` (:func:`normalized_pixel_targets`) and the pixels otherwise.
    Visible patches contribute nothing (MAE Sec. 3: reconstructing them lowers accuracy). In fp32
    (fp64 inputs stay fp64).
    """
    if predictions.shape != patches.shape or mask.shape != patches.shape[:2]:
        raise ConfigError(f"mae_loss: predictions {tuple(predictions.shape)}, patches {tuple(patches.shape)} "
                          f"and mask {tuple(mask.shape)} must be (B, N, P), (B, N, P) and (B, N)")
    target = normalized_pixel_targets(patches) if norm_pix else _at_least_fp32(patches)
    per_patch = (_at_least_fp32(predictions) - target).pow(2).mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)
