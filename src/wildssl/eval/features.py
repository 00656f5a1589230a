"""Frozen features of a dataset: run an encoder over batches and keep one l2-normalized vector per image."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.data.views import IMAGENET_MEAN, IMAGENET_STD  # the normalization every encoder sees
from wildssl.errors import ConfigError, DataError

POOLS = ("cls", "avg")


def preprocess_images(images: torch.Tensor, image_size: int, normalize_images: bool = True) -> torch.Tensor:
    """Turn a batch into the encoder's input: ``(B, 3, S, S)`` -> float32 ``(B, 3, image_size, image_size)``.

    With ``normalize_images`` the batch must be uint8 in [0, 255]; it is scaled to [0, 1], resized
    (bilinear, antialiased) and normalized with ImageNet mean/std. Without it the batch must already be
    a normalized float tensor and is only resized.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"image batch has shape {tuple(images.shape)}; expected (B, 3, H, W)")
    if normalize_images:
        if images.dtype != torch.uint8:
            raise DataError(
                f"image batch is {images.dtype} but normalize_images=True expects uint8 pixels from a wildssl "
                "source; pass normalize_images=False for images that are already normalized floats"
            )
        x = images.float() / 255.0
    else:
        if not images.is_floating_point():
            raise DataError(
                f"image batch is {images.dtype} but normalize_images=False expects normalized float images; "
                "use normalize_images=True for uint8 pixels"
            )
        x = images.float()
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    if normalize_images:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str,
    image_size: int = 224,
    pool: str = "cls",
    normalize_images: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every batch and return ``(features (N, D) float32 l2-normalized, labels (N,) long)`` on CPU.

    ``encoder``: a module whose ``forward(x)`` returns ``{"cls": (B, D), "patch": (B, P, D)}`` (the
    wildssl ``VisionTransformer``). ``batches``: a data loader or any iterable of dicts with ``"image"``
    ``(B, 3, S, S)`` and ``"label"`` ``(B,)`` long (``-1`` = no label). Images go through
    :func:`preprocess_images` on ``device``. ``pool``: ``"cls"`` (class token) or ``"avg"`` (mean of the
    patch tokens). The encoder runs in eval mode; its previous mode is restored afterwards.

    Features stay on the CPU so that large evaluation sets do not fill accelerator memory. In a
    distributed run each rank gets the features of its own shard; gather them with
    :func:`wildssl.distributed.all_gather_no_grad`.
    """
    if pool not in POOLS:
        raise ConfigError(f"feature pool {pool!r} is unknown; use one of {', '.join(POOLS)}")
    device = torch.device(device)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="features", unit="batch")

    was_training = encoder.training
    encoder.eval()
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in batches:
            if "image" not in batch or "label" not in batch:
                raise DataError(f"feature batch has keys {sorted(batch)}; expected 'image' and 'label'")
            images = preprocess_images(batch["image"].to(device, non_blocking=True), image_size, normalize_images)
            out = encoder(images)
            tokens = out["cls"] if pool == "cls" else out["patch"].mean(dim=1)
            features.append(F.normalize(tokens.float(), dim=1).cpu())
            labels.append(torch.as_tensor(batch["label"]).long().cpu())
    finally:
        encoder.train(was_training)

    if not features:
        raise DataError("feature extraction got no batches; the evaluation source is empty")
    return torch.cat(features), torch.cat(labels)
