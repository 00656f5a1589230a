"""RoIAlign (He et al., "Mask R-CNN", ICCV 2017) on feature maps, in plain torch, and the overlap
alignment SlotMIM builds on it.

:func:`roi_align` follows torchvision's ``roi_align(..., aligned=True)``: the box is split into an
``output_size`` grid of bins; each bin is the mean of ``sampling_ratio x sampling_ratio`` bilinear
samples at the centres of a regular sub-grid of the bin. Here boxes are normalized ``(x0, y0, x1, y1)``
in ``[0, 1]`` of the map (0 = left/top edge of the first cell, 1 = right/bottom edge of the last), one box
per map, and a sample point ``u`` reads the map at cell coordinate ``u * W - 0.5`` (cell ``i``'s centre is
at ``(i + 0.5) / W``), which is what ``aligned=True`` means. A sample point is interpolated between the
four nearest cell centres; one past the centre of an edge cell reads that edge cell, as in torchvision up
to one cell beyond the border (further out torchvision reads 0 and this reads the edge; the boxes
aligned here lie inside their maps).

:func:`align_to_overlap` resamples each view's patch map on the region two views share (SlotCon /
SlotMIM's ``invaug``), so that cell ``(i, j)`` of both aligned maps shows the same part of the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wildssl.errors import ConfigError


def roi_align(maps: torch.Tensor, boxes: torch.Tensor, output_size: tuple[int, int],
              sampling_ratio: int = 1) -> torch.Tensor:
    """Resample box ``b`` of map ``b`` onto an ``output_size`` grid: ``(B, C, H, W), (B, 4) -> (B, C, h, w)``.

    Bin ``(i, j)`` of box ``(x0, y0, x1, y1)`` averages the samples at
    ``x = x0 + (j + (s + 0.5) / r) * (x1 - x0) / w`` (``s = 0 .. r - 1``, ``r = sampling_ratio``) and
    likewise in ``y``. torchvision's adaptive default ``r = ceil(box size / output size)`` is 1 whenever the
    box spans no more cells than the output has, which holds for SlotMIM's overlaps (a part of a view
    resampled to the view's own grid), so 1 is the default here.
    """
    if maps.ndim != 4 or boxes.shape != (maps.shape[0], 4):
        raise ConfigError(f"roi_align needs maps (B, C, H, W) with boxes (B, 4); got {tuple(maps.shape)} "
                          f"and {tuple(boxes.shape)}")
    if sampling_ratio < 1:
        raise ConfigError(f"roi_align sampling_ratio must be >= 1, got {sampling_ratio}")
    height, width = output_size
    batch, channels = maps.shape[:2]
    boxes = boxes.to(maps.dtype)
    x0, y0, x1, y1 = boxes.unbind(dim=-1)
    # Fractions of the box at which the samples of every bin lie, bin-major: (w * r,) and (h * r,).
    samples_x, samples_y = width * sampling_ratio, height * sampling_ratio
    cols = (torch.arange(samples_x, device=maps.device, dtype=maps.dtype) + 0.5) / samples_x
    rows = (torch.arange(samples_y, device=maps.device, dtype=maps.dtype) + 0.5) / samples_y
    # grid_sample with align_corners=False reads normalized g at cell coordinate ((g + 1) W - 1) / 2,
    # so g = 2u - 1 reads u * W - 0.5: the aligned=True convention.
    grid_x = 2.0 * (x0[:, None] + (x1 - x0)[:, None] * cols) - 1.0  # (B, w r)
    grid_y = 2.0 * (y0[:, None] + (y1 - y0)[:, None] * rows) - 1.0  # (B, h r)
    grid = torch.stack((grid_x[:, None, :].expand(-1, grid_y.shape[1], -1),
                        grid_y[:, :, None].expand(-1, -1, grid_x.shape[1])), dim=-1)
    samples = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if sampling_ratio == 1:
        return samples
    return samples.view(batch, channels, height, sampling_ratio, width, sampling_ratio).mean(dim=(3, 5))


def align_to_overlap(maps: torch.Tensor, overlap: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """A view's patch map resampled on the overlap of two views, in the image's orientation.

    ``maps`` ``(B, C, h, w)``: per-patch values of the view as the encoder saw it (mirrored where
    ``flipped`` ``(B,)`` is True); ``overlap`` ``(B, 4)``: the overlap in the view's own frame, as
    :func:`wildssl.data.overlap.overlap_in_views` gives it (already mirrored for a flipped view).
    Returns ``(B, C, h, w)``: :func:`roi_align` of the overlap onto the view's own grid, mirrored back
    where the view was flipped, so that the aligned maps of the two views match cell by cell.
    """
    aligned = roi_align(maps, overlap, tuple(maps.shape[-2:]))
    return torch.where(flipped.view(-1, 1, 1, 1), aligned.flip(-1), aligned)
