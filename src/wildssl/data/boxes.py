"""Box maths on normalized ``(x0, y0, x1, y1)`` boxes, shape ``(..., 4)``.

Coordinates are fractions of the *original* image (0 = left/top edge, 1 = right/bottom edge), so they
do not change when the image is resized. All functions are pure, broadcast over leading dimensions and
keep the dtype and device of their inputs.

Flips: a view cropped with a horizontal flip shows its content mirrored, so a point at fraction ``u``
across the unflipped crop appears at ``1 - u`` in the view. Box coordinates *in a view's own frame*
(:func:`relative_box`) therefore take ``src_flipped`` into account, while the view's box in the image
frame (what :mod:`wildssl.data.views` records) is the same whether or not the view was flipped.
"""

from __future__ import annotations

import torch

from wildssl.errors import ConfigError


def _unbind(box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four coordinates of ``box`` ``(..., 4)``; a list or tuple of numbers is taken as a float32 tensor."""
    if not torch.is_tensor(box):
        try:
            box = torch.as_tensor(box, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(f"a box is (x0, y0, x1, y1) numbers or a (..., 4) tensor, got {box!r}") from None
    if box.dim() == 0 or box.shape[-1] != 4:
        raise ConfigError(f"a box is (x0, y0, x1, y1): a (..., 4) tensor, got shape {tuple(box.shape)}")
    return box[..., 0], box[..., 1], box[..., 2], box[..., 3]


def box_area(box: torch.Tensor) -> torch.Tensor:
    """Area of ``box`` ``(..., 4)`` as a fraction of the image, ``(...)``; inverted boxes have area 0."""
    x0, y0, x1, y1 = _unbind(box)
    return (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of ``a`` and ``b`` (both ``(..., 4)``, broadcast), ``(...)``.

    Element-wise, not pairwise: for an ``(N, M)`` matrix pass ``a[:, None]`` and ``b[None]``.
    Two boxes of zero area have IoU 0 (instead of 0/0).
    """
    ax0, ay0, ax1, ay1 = _unbind(a)
    bx0, by0, bx1, by1 = _unbind(b)
    inter_w = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp(min=0)
    inter_h = (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp(min=0)
    inter = inter_w * inter_h
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def flip_box_horizontally(box: torch.Tensor) -> torch.Tensor:
    """Mirror ``box`` ``(..., 4)`` about the vertical centre line: ``(1 - x1, y0, 1 - x0, y1)``."""
    x0, y0, x1, y1 = _unbind(box)
    return torch.stack((1 - x1, y0, 1 - x0, y1), dim=-1)


def relative_box(
    src: torch.Tensor, tgt: torch.Tensor, src_flipped: torch.Tensor | None = None
) -> torch.Tensor:
    """``tgt`` expressed in the frame of ``src`` (both ``(..., 4)`` in image coordinates), ``(..., 4)``.

    ``((tgt.x0 - src.x0) / src.w, (tgt.y0 - src.y0) / src.h, (tgt.x1 - src.x0) / src.w, ...)``, so
    ``relative_box(b, b) == (0, 0, 1, 1)``. Values fall outside [0, 1] where ``tgt`` sticks out of
    ``src``. ``src_flipped`` ``(...)`` bool: where True, the view of ``src`` was flipped horizontally
    and the result is mirrored to match what that view shows. ``src`` must have non-zero width/height.
    """
    sx0, sy0, sx1, sy1 = _unbind(src)
    tx0, ty0, tx1, ty1 = _unbind(tgt)
    width, height = sx1 - sx0, sy1 - sy0
    rel = torch.stack(
        ((tx0 - sx0) / width, (ty0 - sy0) / height, (tx1 - sx0) / width, (ty1 - sy0) / height), dim=-1
    )
    if src_flipped is None:
        return rel
    return torch.where(src_flipped.unsqueeze(-1), flip_box_horizontally(rel), rel)


def absolute_box(
    src: torch.Tensor, rel: torch.Tensor, src_flipped: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`relative_box`: a box ``rel`` given in ``src``'s frame, back in image coordinates.

    ``absolute_box(src, relative_box(src, tgt, f), f) == tgt``. Shapes ``(..., 4)``; ``src_flipped``
    ``(...)`` bool as in :func:`relative_box`.
    """
    if src_flipped is not None:
        rel = torch.where(src_flipped.unsqueeze(-1), flip_box_horizontally(rel), rel)
    sx0, sy0, sx1, sy1 = _unbind(src)
    rx0, ry0, rx1, ry1 = _unbind(rel)
    width, height = sx1 - sx0, sy1 - sy0
    return torch.stack(
        (sx0 + rx0 * width, sy0 + ry0 * height, sx0 + rx1 * width, sy0 + ry1 * height), dim=-1
    )


def discretize_box(
    box: torch.Tensor, num_bins: int, value_range: tuple[float, float] = (-1.0, 2.0)
) -> torch.Tensor:
    """Quantize each coordinate of ``box`` ``(..., 4)`` into ``num_bins`` equal bins, ``(..., 4)`` long.

    Coordinates are clamped into ``value_range`` first; the default ``(-1, 2)`` leaves room for
    relative boxes that stick out of their reference view by up to one view width on either side
    (pass ``(0, 1)`` for boxes known to lie inside the image). Bin ``k`` covers
    ``[low + k * step, low + (k + 1) * step)`` with ``step = (high - low) / num_bins``; ``high`` falls in
    the last bin.
    """
    low, high = value_range
    if num_bins < 1 or not high > low:
        raise ConfigError(
            f"box discretization: got num_bins={num_bins}, value_range={value_range}; "
            "need num_bins >= 1 and value_range (low, high) with low < high"
        )
    scaled = (box.clamp(low, high) - low) * (num_bins / (high - low))
    return scaled.floor().long().clamp(0, num_bins - 1)
