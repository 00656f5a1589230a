import math

import pytest
import torch

from wildssl.errors import ConfigError
from wildssl.models.roi_align import roi_align


def _bilinear(value: torch.Tensor, y: float, x: float) -> float:
    """torchvision's ``bilinear_interpolate`` (roi_align_kernel.cpp), written out for one sample."""
    height, width = value.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(math.floor(y)), int(math.floor(x))
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return float(hy * hx * value[y_low, x_low] + hy * lx * value[y_low, x_high]
                 + ly * hx * value[y_high, x_low] + ly * lx * value[y_high, x_high])


def _roi_align_reference(maps: torch.Tensor, boxes: torch.Tensor, out_h: int, out_w: int, ratio: int) -> torch.Tensor:
    """torchvision's roi_align(aligned=True) in float64 loops, boxes normalized to the map."""
    batch, channels, height, width = maps.shape
    out = torch.zeros(batch, channels, out_h, out_w, dtype=torch.float64)
    for b in range(batch):
        x0, y0, x1, y1 = (float(v) for v in boxes[b])
        start_x, start_y = x0 * width - 0.5, y0 * height - 0.5
        bin_w, bin_h = (x1 - x0) * width / out_w, (y1 - y0) * height / out_h
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    total = 0.0
                    for sy in range(ratio):
                        for sx in range(ratio):
                            y = start_y + i * bin_h + (sy + 0.5) * bin_h / ratio
                            x = start_x + j * bin_w + (sx + 0.5) * bin_w / ratio
                            total += _bilinear(maps[b, c], y, x)
                    out[b, c, i, j] = total / ratio**2
    return out


@pytest.mark.parametrize("ratio", [1, 2])
def test_roi_align_matches_torchvision_semantics_in_float64(ratio):
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 2, 5, 6, generator=generator, dtype=torch.float64)
    # Inside the map, touching its edges (the clamped border samples), and a thin box.
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0], [0.55, 0.05, 0.6, 0.95]], dtype=torch.float64)
    expected = _roi_align_reference(maps, boxes, 4, 3, ratio)
    assert torch.allclose(roi_align(maps, boxes, (4, 3), sampling_ratio=ratio), expected, atol=1e-12)


def test_roi_align_of_the_whole_map_onto_its_own_grid_is_the_identity():
    maps = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2, dtype=torch.float64)
    assert torch.allclose(roi_align(maps, whole, (4, 5)), maps, atol=1e-12)


def test_roi_align_rejects_mismatched_boxes_and_ratios_in_one_line():
    with pytest.raises(ConfigError, match="boxes"):
        roi_align(torch.zeros(2, 1, 3, 3), torch.zeros(3, 4), (2, 2))
    with pytest.raises(ConfigError, match="sampling_ratio"):
        roi_align(torch.zeros(1, 1, 3, 3), torch.zeros(1, 4), (2, 2), sampling_ratio=0)
