"""Ordered crop pairs for annotation bootstrapping (seed 000, Alg. 1).

A bootstrap image gets ``n`` crops. Every ordered pair ``(i, j)`` with ``i != j`` is one training
example: the student sees crop ``i`` (the *source*) and the box of crop ``j`` (the *target*) in
the source crop's frame, and predicts the teacher's annotation distribution on crop ``j``.
There are ``P = n * (n - 1)`` pairs per image, always listed source-major::

    (0, 1), (0, 2), ..., (0, n-1), (1, 0), (1, 2), ..., (n-1, n-2)

so a ``(B, P, ...)`` tensor reshapes to ``(B, n, n - 1, ...)`` grouped by source crop, which is
how :class:`wildssl.models.box_decoder.BoxQueryDecoder` packs all pairs into one pass.

Boxes are normalized ``(x0, y0, x1, y1)`` in the original image (see ``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wildssl.data.boxes import box_iou, relative_box
from wildssl.data.views import sample_crop_boxes
from wildssl.errors import ConfigError


def ordered_pairs(n_crops: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs ``(i, j)``, ``i != j``, of ``n_crops`` crops, source-major.

    Returns ``(src_idx, tgt_idx)``, two long tensors of shape ``(P,)`` with ``P = n^2 - n``.
    """
    if n_crops < 2:
        raise ConfigError(
            f"annotation bootstrapping needs at least 2 crops per image to form pairs, got n_crops={n_crops}; "
            "use n_crops >= 2 (the paper uses 4)"
        )
    src = torch.arange(n_crops, device=device)
    slot = torch.arange(n_crops - 1, device=device)
    # Slot k of source i is target k, shifted past i itself so (i, i) never appears.
    tgt = slot[None, :] + (slot[None, :] >= src[:, None]).long()
    return src.repeat_interleave(n_crops - 1), tgt.reshape(-1)


def pack_pairs(
    crop_boxes: torch.Tensor,
    crop_flipped: torch.Tensor | None = None,
    target_boxes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Describe every ordered pair of a batch of crops.

    Args:
        crop_boxes: ``(B, n, 4)`` box of each crop in its original image.
        crop_flipped: ``(B, n)`` bool, whether the crop was mirrored horizontally before the
            encoder saw it; ``None`` means no crop was flipped.
        target_boxes: ``(B, P, 4)`` a target box of its own for every pair (the IoU-range ablation,
            :func:`sample_targets_in_iou_range`); ``None``: pair ``(i, j)``'s target is crop ``j``.

    Returns a dict with
        ``src_idx``, ``tgt_idx``: ``(P,)`` long, from :func:`ordered_pairs`;
        ``relative_boxes``: ``(B, P, 4)`` the target box in the source crop's frame, i.e. in
        coordinates where the source crop *as the encoder saw it* spans ``(0, 0, 1, 1)``. A
        flipped source crop has a mirrored frame, so ``x -> 1 - x`` (and ``x0``/``x1`` swap to
        keep ``x0 <= x1``). A flipped *target* changes the teacher's view of crop ``j`` but not
        where crop ``j`` lies, so it does not enter the box;
        ``iou``: ``(B, P)`` IoU of source and target boxes in the original image.
    """
    if crop_boxes.ndim != 3 or crop_boxes.shape[-1] != 4:
        raise ValueError(f"crop_boxes must have shape (B, n, 4), got {tuple(crop_boxes.shape)}")
    if crop_flipped is not None and crop_flipped.shape != crop_boxes.shape[:2]:
        raise ValueError(
            f"crop_flipped must have shape {tuple(crop_boxes.shape[:2])} matching crop_boxes, "
            f"got {tuple(crop_flipped.shape)}"
        )
    src_idx, tgt_idx = ordered_pairs(crop_boxes.shape[1], device=crop_boxes.device)
    src_boxes = crop_boxes[:, src_idx]
    if target_boxes is None:
        tgt_boxes = crop_boxes[:, tgt_idx]
    elif target_boxes.shape != src_boxes.shape:
        raise ValueError(f"target_boxes must have shape {tuple(src_boxes.shape)} (one box per pair), "
                         f"got {tuple(target_boxes.shape)}")
    else:
        tgt_boxes = target_boxes
    src_flipped = None if crop_flipped is None else crop_flipped[:, src_idx].bool()
    return {
        "src_idx": src_idx,
        "tgt_idx": tgt_idx,
        "relative_boxes": relative_box(src_boxes, tgt_boxes, src_flipped),
        "iou": box_iou(src_boxes, tgt_boxes),
    }


def check_iou_range(value: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` if ``value`` is two numbers with ``0 <= low <= high <= 1`` and ``high > 0``, else a
    one-line ConfigError naming ``method.ab_iou_range``."""
    ok = (isinstance(value, Sequence) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if not ok or not (0.0 <= value[0] <= value[1] <= 1.0 and value[1] > 0.0):
        raise ConfigError(f"method.ab_iou_range={value!r} is invalid; it needs [low, high] with "
                          "0 <= low <= high <= 1 and high > 0 (e.g. [0.3, 0.7]; [0.0, 1.0] keeps every pair)")
    return float(value[0]), float(value[1])


def sample_targets_in_iou_range(
    source_boxes: torch.Tensor,
    low: float,
    high: float,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    aspect: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    candidates: int = 16,
    rounds: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target boxes for the source/target IoU ablation (seed 000): every pair keeps its own target.

    The ``n`` source crops of each image are the usual ones; for each ordered pair ``(i, j)`` a fresh
    target box is drawn from the same RandomResizedCrop(``scale``, ``ratio``) as the crops, by
    rejection until its IoU with source ``i`` lies in ``[low, high]`` (both ends inclusive). Each
    round draws ``candidates`` boxes for every pair still without one (vectorized over all of them)
    and keeps the first that fits; after ``rounds`` rounds the pairs still without one (a range that
    source cannot reach: a whole-image source has IoU >= 0.05 with every crop of scale >= 0.05) keep
    their last candidate and are reported as not ``found``, for the loss to leave out.

    So the sources' marginal is RandomResizedCrop's exactly, every target is a RandomResizedCrop box
    conditioned only on its IoU with its source, and there are ``n (n - 1)`` pairs per image whatever
    the range, as without it. (A range also tilts the targets' marginal: low IoU favours small targets,
    which can miss a large source; see tests/test_pairs.py for the measured effect.)

    Args:
        source_boxes: ``(B, n, 4)`` the crops of each image (normalized x0, y0, x1, y1).
        low, high: the IoU range (see :func:`check_iou_range`).
        scale, ratio: the crops' RandomResizedCrop parameters.
        aspect: ``(B,)`` W/H of the original images (default 1).
        generator: draws every candidate (on its device), so a seed gives the same targets.
        candidates, rounds: the rejection budget per pair.

    Returns ``(target_boxes (B, P, 4), found (B, P) bool)`` in the pair order of :func:`ordered_pairs`.
    """
    low, high = check_iou_range((low, high))
    if source_boxes.ndim != 3 or source_boxes.shape[-1] != 4:
        raise ValueError(f"source_boxes must have shape (B, n, 4), got {tuple(source_boxes.shape)}")
    batch, n_crops, _ = source_boxes.shape
    device = source_boxes.device
    src_idx, _ = ordered_pairs(n_crops, device=device)
    sources = source_boxes[:, src_idx].reshape(-1, 4)  # (B * P, 4), image-major
    num_pairs = src_idx.numel()
    if aspect is None:
        aspect = torch.ones(batch, device=device)
    pair_aspect = aspect.to(device=device, dtype=torch.float32).repeat_interleave(num_pairs)  # (B * P,)
    targets = torch.zeros_like(sources)
    found = torch.zeros(sources.shape[0], dtype=torch.bool, device=device)
    for _ in range(rounds):
        missing = (~found).nonzero().squeeze(1)
        if missing.numel() == 0:
            break
        drawn = sample_crop_boxes(missing.numel() * candidates, scale, ratio, pair_aspect[missing].repeat(candidates),
                                  generator, device).to(sources.dtype)
        drawn = drawn.view(candidates, missing.numel(), 4)  # candidate-major, like the aspect repeat
        iou = box_iou(sources[missing].unsqueeze(0), drawn)  # (candidates, missing)
        fits = (iou >= low) & (iou <= high)
        first = fits.to(torch.uint8).argmax(dim=0)  # the first fitting candidate (0 when none fits)
        chosen = drawn[first, torch.arange(missing.numel(), device=device)]
        hit = fits.any(dim=0)
        # A pair without a fit keeps its latest candidate, replaced if a later round finds one.
        targets[missing] = torch.where(hit.unsqueeze(1), chosen, drawn[-1])
        found[missing] = hit
    return targets.view(batch, num_pairs, 4), found.view(batch, num_pairs)
