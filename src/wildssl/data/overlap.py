"""Two views of an image that share a region, and where that region lies in each view (SlotCon, Wen et
al. NeurIPS 2022; SlotMIM, Wen et al. CVPR 2025).

SlotMIM's cross-view patch loss compares the two views' patch maps on the region they share. The second
crop is therefore drawn to overlap the first, as SlotCon's two-crop transform does: up to ``attempts``
RandomResizedCrop boxes are drawn and the first one with at least ``min_overlap`` of its own area inside
the first crop is kept; when none qualifies, the first draw is kept (an ordinary crop, which may miss the
first view: :attr:`Overlap.valid` says so, and the loss leaves such pairs out).

Boxes are normalized ``(x0, y0, x1, y1)`` of the original image (:mod:`wildssl.data.boxes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wildssl.data.boxes import box_area, relative_box
from wildssl.data.photometric import apply_pipeline
from wildssl.data.views import CropSpec, ViewBatch, crop_and_resize, make_views, normalize, sample_crop_boxes
from wildssl.errors import ConfigError


@dataclass
class Overlap:
    """Where the region two views share lies in each: ``in_a``, ``in_b`` ``(B, 4)`` in the frame of view a
    and of view b *as the encoder saw it* (mirrored for a flipped view, see
    :func:`wildssl.data.boxes.relative_box`); ``valid`` ``(B,)`` bool, False where the views share no
    region of positive area (the boxes of such rows are meaningless)."""

    in_a: torch.Tensor
    in_b: torch.Tensor
    valid: torch.Tensor


def intersection_box(box_a: torch.Tensor, box_b: torch.Tensor) -> torch.Tensor:
    """The intersection of ``box_a`` and ``box_b`` ``(..., 4)``, ``(..., 4)``; inverted (x1 < x0 or
    y1 < y0) where they are disjoint."""
    return torch.cat((torch.maximum(box_a[..., :2], box_b[..., :2]), torch.minimum(box_a[..., 2:], box_b[..., 2:])),
                     dim=-1)


def overlap_in_views(box_a: torch.Tensor, box_b: torch.Tensor, flipped_a: torch.Tensor,
                     flipped_b: torch.Tensor) -> Overlap:
    """The overlap of views with image boxes ``box_a``, ``box_b`` ``(B, 4)`` and flips ``(B,)``, in each
    view's frame (SlotCon's ``_clip_coords``, then its flip of the coordinates)."""
    shared = intersection_box(box_a, box_b)
    valid = (shared[:, 2] > shared[:, 0]) & (shared[:, 3] > shared[:, 1])
    return Overlap(relative_box(box_a, shared, flipped_a), relative_box(box_b, shared, flipped_b), valid)


def sample_overlapping_boxes(reference: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                             aspect: torch.Tensor, generator: torch.Generator, min_overlap: float,
                             attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes ``(B, 4)``, each covering at least ``min_overlap`` of its own area inside
    ``reference`` ``(B, 4)`` where one of ``attempts`` draws does (else the first draw).

    ``aspect`` ``(B,)``: W/H of the original images; every draw comes from ``generator``."""
    if not 0.0 <= min_overlap <= 1.0 or attempts < 1:
        raise ConfigError(f"overlapping crops need 0 <= min_overlap <= 1 and attempts >= 1; got "
                          f"min_overlap={min_overlap}, attempts={attempts}")
    batch = reference.shape[0]
    candidates = sample_crop_boxes(batch * attempts, scale, ratio, aspect.repeat(attempts), generator,
                                   reference.device).view(attempts, batch, 4)
    shared = box_area(intersection_box(candidates, reference.unsqueeze(0)))
    accepted = shared >= min_overlap * box_area(candidates)  # (attempts, B)
    first = accepted.to(torch.uint8).argmax(dim=0)  # the first accepted draw; 0 when none is
    return candidates[first, torch.arange(batch, device=reference.device)]


def overlapping_views(images: torch.Tensor, specs: Sequence[CropSpec], generator: torch.Generator,
                      aspect: torch.Tensor | None = None, min_overlap: float = 0.01) -> list[ViewBatch]:
    """Two :class:`ViewBatch` of uint8 ``images`` ``(B, 3, H, W)``: the first as
    :func:`wildssl.data.views.make_views` makes it from ``specs[0]``, the second from ``specs[1]`` with a
    box drawn by :func:`sample_overlapping_boxes` to overlap the first."""
    if len(specs) != 2:
        raise ConfigError(f"overlapping_views makes two views; got {len(specs)} crop specs")
    batch = images.shape[0]
    if aspect is None:
        aspect = torch.full((batch,), images.shape[-1] / images.shape[-2], device=images.device)
    first = make_views(images, specs[:1], generator, aspect=aspect)[0]
    spec = specs[1]
    boxes = sample_overlapping_boxes(first.boxes, spec.scale, spec.ratio, aspect, generator, min_overlap)
    draws = torch.rand((batch,), generator=generator, device=generator.device).to(images.device)
    flipped = draws < spec.flip_prob
    pixels = crop_and_resize(images.float().div_(255.0), boxes, spec.size, flipped)
    if spec.photometric is not None:
        pixels = apply_pipeline(spec.photometric, pixels, generator)
    return [first, ViewBatch(normalize(pixels), boxes, flipped, first.source_index)]
