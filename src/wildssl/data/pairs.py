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

import torch

from wildssl.data.boxes import box_iou, relative_box
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


def pack_pairs(crop_boxes: torch.Tensor, crop_flipped: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Describe every ordered pair of a batch of crops.

    Args:
        crop_boxes: ``(B, n, 4)`` box of each crop in its original image.
        crop_flipped: ``(B, n)`` bool, whether the crop was mirrored horizontally before the
            encoder saw it; ``None`` means no crop was flipped.

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
    tgt_boxes = crop_boxes[:, tgt_idx]
    src_flipped = None if crop_flipped is None else crop_flipped[:, src_idx].bool()
    return {
        "src_idx": src_idx,
        "tgt_idx": tgt_idx,
        "relative_boxes": relative_box(src_boxes, tgt_boxes, src_flipped),
        "iou": box_iou(src_boxes, tgt_boxes),
    }


def sample_pairs_in_iou_range(crop_boxes: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Valid-pair mask for the source/target IoU ablation (seed 000).

    Crops are sampled as usual and pairs whose source/target IoU falls outside ``[low, high]``
    (both ends inclusive) are filtered out, so the crop marginals are unchanged and only the
    pair distribution is restricted. Pass the mask as ``valid`` to
    :func:`wildssl.losses.bootstrap_loss.bootstrap_loss`, which averages over valid pairs only.

    Args:
        crop_boxes: ``(B, n, 4)`` box of each crop in its original image.
        low, high: IoU range, ``0 <= low <= high <= 1``.

    Returns ``(B, P)`` bool, in the pair order of :func:`ordered_pairs`.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(
            f"bootstrap IoU range [{low}, {high}] is invalid; it needs 0 <= low <= high <= 1"
        )
    src_idx, tgt_idx = ordered_pairs(crop_boxes.shape[1], device=crop_boxes.device)
    iou = box_iou(crop_boxes[:, src_idx], crop_boxes[:, tgt_idx])
    return (iou >= low) & (iou <= high)
