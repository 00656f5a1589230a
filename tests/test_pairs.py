from __future__ import annotations

import pytest
import torch

from wildssl.data.pairs import ordered_pairs, pack_pairs, sample_pairs_in_iou_range
from wildssl.errors import ConfigError


def _random_boxes(batch: int, n_crops: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch, n_crops, 2, 2, generator=generator, dtype=torch.float64)
    low = corners.min(dim=2).values
    high = corners.max(dim=2).values + 0.05  # never degenerate
    return torch.cat((low, high.clamp(max=1.0)), dim=-1)


def _expected_relative(src: list[float], tgt: list[float], src_flipped: bool) -> list[float]:
    sx0, sy0, sx1, sy1 = src
    width, height = sx1 - sx0, sy1 - sy0
    x0, x1 = (tgt[0] - sx0) / width, (tgt[2] - sx0) / width
    y0, y1 = (tgt[1] - sy0) / height, (tgt[3] - sy0) / height
    if src_flipped:
        x0, x1 = 1 - x1, 1 - x0
    return [x0, y0, x1, y1]


def _expected_iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


@pytest.mark.parametrize("n_crops", [2, 3, 4, 6])
def test_ordered_pairs_lists_each_ordered_pair_once_source_major_without_self_pairs(n_crops):
    src, tgt = ordered_pairs(n_crops)
    assert src.dtype == tgt.dtype == torch.long
    expected = [(i, j) for i in range(n_crops) for j in range(n_crops) if i != j]
    assert list(zip(src.tolist(), tgt.tolist())) == expected
    assert len(expected) == n_crops**2 - n_crops


def test_ordered_pairs_rejects_fewer_than_two_crops():
    with pytest.raises(ConfigError, match="n_crops=1"):
        ordered_pairs(1)


def test_pack_pairs_relative_boxes_and_iou_match_independent_formulas():
    boxes = _random_boxes(2, 4)
    packed = pack_pairs(boxes)
    src, tgt = packed["src_idx"].tolist(), packed["tgt_idx"].tolist()
    assert packed["relative_boxes"].shape == (2, 12, 4)
    assert packed["iou"].shape == (2, 12)
    for b in range(2):
        for p, (i, j) in enumerate(zip(src, tgt)):
            assert i != j
            expected = _expected_relative(boxes[b, i].tolist(), boxes[b, j].tolist(), src_flipped=False)
            torch.testing.assert_close(packed["relative_boxes"][b, p], torch.tensor(expected, dtype=torch.float64))
            expected_iou = _expected_iou(boxes[b, i].tolist(), boxes[b, j].tolist())
            assert packed["iou"][b, p].item() == pytest.approx(expected_iou)


def test_pack_pairs_mirrors_the_frame_of_flipped_source_crops_only():
    boxes = _random_boxes(2, 3, seed=1)
    flipped = torch.tensor([[True, False, False], [False, True, True]])
    packed = pack_pairs(boxes, flipped)
    for b in range(2):
        for p, (i, j) in enumerate(zip(packed["src_idx"].tolist(), packed["tgt_idx"].tolist())):
            expected = _expected_relative(boxes[b, i].tolist(), boxes[b, j].tolist(), bool(flipped[b, i]))
            torch.testing.assert_close(packed["relative_boxes"][b, p], torch.tensor(expected, dtype=torch.float64))
    # Flipping a crop changes nothing when that crop is only the target.
    unflipped = pack_pairs(boxes)["relative_boxes"]
    target_only = packed["src_idx"] == 0
    torch.testing.assert_close(packed["relative_boxes"][1, target_only], unflipped[1, target_only])


def test_pack_pairs_flipped_source_sees_its_left_half_on_the_right():
    source = [0.2, 0.2, 0.6, 0.6]
    left_half = [0.2, 0.2, 0.4, 0.6]
    boxes = torch.tensor([[source, left_half]], dtype=torch.float64)
    relative = pack_pairs(boxes, torch.tensor([[True, False]]))["relative_boxes"]
    torch.testing.assert_close(relative[0, 0], torch.tensor([0.5, 0.0, 1.0, 1.0], dtype=torch.float64))


def test_pack_pairs_identical_crops_give_the_unit_box_and_iou_one():
    box = [0.1, 0.3, 0.7, 0.9]
    packed = pack_pairs(torch.tensor([[box, box, box]], dtype=torch.float64))
    unit_box = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(packed["relative_boxes"], unit_box.expand(1, 6, 4))
    torch.testing.assert_close(packed["iou"], torch.ones(1, 6, dtype=torch.float64))


def test_sample_pairs_in_iou_range_keeps_exactly_the_pairs_inside_the_closed_range():
    boxes = _random_boxes(3, 4, seed=2)
    low, high = 0.1, 0.5
    mask = sample_pairs_in_iou_range(boxes, low, high)
    src, tgt = ordered_pairs(4)
    assert mask.shape == (3, 12) and mask.dtype == torch.bool
    for b in range(3):
        for p, (i, j) in enumerate(zip(src.tolist(), tgt.tolist())):
            iou = _expected_iou(boxes[b, i].tolist(), boxes[b, j].tolist())
            assert bool(mask[b, p]) == (low <= iou <= high)
    assert 0 < int(mask.sum()) < mask.numel()  # the check above saw both outcomes


def test_sample_pairs_in_iou_range_includes_identical_boxes_at_the_upper_end():
    box = [0.1, 0.3, 0.7, 0.9]
    mask = sample_pairs_in_iou_range(torch.tensor([[box, box]], dtype=torch.float64), 0.5, 1.0)
    assert mask.all()


@pytest.mark.parametrize("low, high", [(0.6, 0.2), (-0.1, 0.5), (0.2, 1.5)])
def test_sample_pairs_in_iou_range_rejects_invalid_ranges(low, high):
    with pytest.raises(ConfigError, match="IoU range"):
        sample_pairs_in_iou_range(_random_boxes(1, 3), low, high)
