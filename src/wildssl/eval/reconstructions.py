"""``wildssl plot RUN --reconstructions IMAGES``: what a masked autoencoder learned, as a picture.

One row per image, three panels side by side: the original (resized to the run's crop size), the
masked input (hidden patches blanked to :data:`BLANK`: exactly what the encoder did not see) and the
reconstruction (the decoder's pixels on the hidden patches, the visible patches pasted back, as in the
MAE paper's figures). With ``norm_pix_loss`` the decoder predicts per-patch normalized pixels, so each
predicted patch is drawn with the mean and variance of the true patch (the MAE demo does the same);
the picture shows structure, not the patches' mean colour. Needs matplotlib.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wildssl.data import collate, open_source
from wildssl.data.views import IMAGENET_MEAN, IMAGENET_STD, preprocess_images
from wildssl.errors import ConfigError, DataError
from wildssl.io import read_safetensors
from wildssl.losses.mae_loss import NORM_PIX_EPS, patchify, unpatchify
from wildssl.models.loading import (
    CHECKPOINT_FORMAT,
    load_state_strict,
    resolve_checkpoint,
)

BLANK = (128, 128, 128)  # RGB of a hidden patch in the masked panel
PANELS = ("original", "masked", "reconstruction")
HEADER = 24  # pixels above the panels for their titles
GAP = 4  # white pixels between panels and rows
MIN_SIDE = 96  # panels are enlarged (nearest neighbour, integer factor) to at least this many pixels


@dataclass
class Reconstructions:
    """``original``, ``masked``, ``reconstruction``: uint8 ``(B, H, W, 3)``; ``mask`` ``(B, N)`` bool,
    True where a patch was hidden; ``patch_size`` and ``grid`` ``(h, w)`` locate the patches."""

    original: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    mask: np.ndarray
    patch_size: int
    grid: tuple[int, int]


def load_masked_autoencoder(run: str | Path):
    """The MAE method of a run directory or checkpoint, with its trained weights, in eval mode; a
    ConfigError when the run trained another method (only MAE reconstructs pixels)."""
    from wildssl.methods import (
        build_method,  # the methods import the encoder loading of this package
    )

    path = resolve_checkpoint(run)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT or "config" not in metadata:
        raise ConfigError(f"--reconstructions needs a training checkpoint of an MAE run; {path} is not one")
    config = json.loads(metadata["config"])
    if config["method"]["name"] != "mae":
        raise ConfigError(f"--reconstructions needs an MAE run; {path} trained {config['method']['name']!r}")
    method = build_method(config)
    load_state_strict(method, {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
                      str(path))
    return method.eval()


def _to_uint8(normalized: torch.Tensor) -> np.ndarray:
    """Normalized ``(B, 3, H, W)`` -> uint8 ``(B, H, W, 3)`` pixels."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=normalized.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=normalized.dtype).view(1, 3, 1, 1)
    pixels = (normalized.cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstruct_images(method, images: torch.Tensor, seed: int = 0) -> Reconstructions:
    """The three panels of uint8 ``images`` ``(B, 3, S, S)`` under masks drawn from ``seed``."""
    size = method.options["crop_size"]
    x = preprocess_images(images, size)
    mask, predictions = method.reconstruct(x, torch.Generator().manual_seed(seed))
    patches = patchify(x, method.patch_size)
    if method.options["norm_pix_loss"]:
        mean = patches.mean(dim=-1, keepdim=True)
        std = torch.sqrt(patches.var(dim=-1, keepdim=True, unbiased=True) + NORM_PIX_EPS)
        predictions = predictions * std + mean
    original = _to_uint8(x)
    predicted = _to_uint8(unpatchify(predictions.float(), method.patch_size, method.grid))
    hidden = unpatchify(mask[..., None].expand(patches.shape).float(), method.patch_size, method.grid)
    hidden = hidden[:, 0].bool().cpu().numpy()[..., None]  # (B, H, W, 1)
    masked = np.where(hidden, np.array(BLANK, dtype=np.uint8), original)
    reconstruction = np.where(hidden, predicted, original)
    return Reconstructions(original, masked, reconstruction, mask.cpu().numpy(), method.patch_size, method.grid)


def panel_scale(size: int) -> int:
    """The integer enlargement of a ``size``-pixel panel in the picture."""
    return max(1, -(-MIN_SIDE // size))


def compose(recon: Reconstructions) -> np.ndarray:
    """The picture's pixels below the header: rows of ``original | masked | reconstruction`` panels,
    each enlarged by :func:`panel_scale`, separated by :data:`GAP` white pixels. uint8 ``(H, W, 3)``."""
    count, size = recon.original.shape[:2]
    scale = panel_scale(size)
    side = size * scale
    canvas = np.full((count * side + (count - 1) * GAP, 3 * side + 2 * GAP, 3), 255, dtype=np.uint8)
    for row in range(count):
        for column, name in enumerate(PANELS):
            panel = getattr(recon, name)[row].repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = row * (side + GAP), column * (side + GAP)
            canvas[top: top + side, left: left + side] = panel
    return canvas


def plot_reconstructions(run: str | Path, images: str, out: str | Path | None = None, count: int = 8,
                         seed: int = 0) -> Path:
    """Write ``<run>/reconstructions.png`` (or ``out``) for the first ``count`` images of the data spec
    ``images``, masks drawn from ``seed``. The panels start :data:`HEADER` pixels below the top."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("wildssl plot needs matplotlib: pip install matplotlib (or wildssl[plot])") from None
    if count < 1:
        raise ConfigError(f"--count {count} must be at least 1")
    method = load_masked_autoencoder(run)
    source = open_source(images, load_size=method.options["crop_size"])
    if len(source) == 0:
        raise DataError(f"no images in {images} to reconstruct")
    batch = collate([source[i] for i in range(min(count, len(source)))])
    canvas = compose(reconstruct_images(method, batch["image"], seed))
    height, width = canvas.shape[0] + HEADER, canvas.shape[1]
    dpi = 100
    figure = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    figure.figimage(canvas, xo=0, yo=0, origin="upper")
    side = (width - 2 * GAP) // 3
    for column, name in enumerate(PANELS):
        figure.text((column * (side + GAP) + side / 2) / width, 1 - HEADER / 2 / height, name,
                    ha="center", va="center", fontsize=9)
    out = Path(out) if out else Path(run) / "reconstructions.png"
    figure.savefig(out, dpi=dpi, facecolor="white")
    plt.close(figure)
    return out
