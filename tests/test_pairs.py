from __future__ import annotations

import pytest
import torch

from wildssl.data.boxes import box_iou
from wildssl.data.pairs import ordered_pairs, pack_pairs, sample_targets_in_iou_range
from wildssl.data.views import sample_crop_boxes
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


def test_pack_pairs_with_target_boxes_relates_each_pair_to_its_own_target():
    boxes = _random_boxes(2, 3, seed=3)
    targets = _random_boxes(2, 6, seed=4)
    packed = pack_pairs(boxes, target_boxes=targets)
    for b in range(2):
        for p, i in enumerate(packed["src_idx"].tolist()):
            expected = _expected_relative(boxes[b, i].tolist(), targets[b, p].tolist(), src_flipped=False)
            torch.testing.assert_close(packed["relative_boxes"][b, p], torch.tensor(expected, dtype=torch.float64))
            expected_iou = _expected_iou(boxes[b, i].tolist(), targets[b, p].tolist())
            assert packed["iou"][b, p].item() == pytest.approx(expected_iou)
    with pytest.raises(ValueError, match="target_boxes"):
        pack_pairs(boxes, target_boxes=targets[:, :5])


def _crops(images: int, n_crops: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    aspect = 0.6 + torch.rand(images, generator=generator)
    boxes = sample_crop_boxes(images * n_crops, (0.05, 1.0), aspect=aspect.repeat_interleave(n_crops),
                              generator=generator)
    return boxes.view(images, n_crops, 4), aspect


def test_targets_in_iou_range_give_every_pair_a_random_resized_crop_in_the_range():
    sources, aspect = _crops(8, 4, seed=5)
    targets, found = sample_targets_in_iou_range(sources, 0.2, 0.6, (0.05, 1.0), aspect=aspect,
                                                 generator=torch.Generator().manual_seed(6))
    assert targets.shape == (8, 12, 4) and found.shape == (8, 12) and found.all()  # n (n - 1) pairs per image
    src_idx, _ = ordered_pairs(4)
    for b in range(8):
        for p, i in enumerate(src_idx.tolist()):
            assert 0.2 <= _expected_iou(sources[b, i].tolist(), targets[b, p].tolist()) <= 0.6
            x0, y0, x1, y1 = targets[b, p].tolist()
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
            assert 0.05 - 1e-6 <= (x1 - x0) * (y1 - y0) <= 1.0  # RandomResizedCrop's scale ...
            assert 3 / 4 - 1e-5 <= (x1 - x0) * aspect[b].item() / (y1 - y0) <= 4 / 3 + 1e-5  # ... and pixel ratio


def _ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    points = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def test_targets_in_iou_range_are_distributed_as_random_resized_crops_given_their_iou():
    low, high = 0.1, 0.5
    sources, aspect = _crops(600, 2, seed=7)
    targets, found = sample_targets_in_iou_range(sources, low, high, (0.05, 1.0), aspect=aspect,
                                                 generator=torch.Generator().manual_seed(8))
    # Reference: for each pair, 512 independent RandomResizedCrop draws and one in-range draw picked at
    # random among them (drawn again for a pair where none fits).
    generator = torch.Generator().manual_seed(9)
    pair_sources = sources.reshape(-1, 4)  # pairs (0, 1), (1, 0) of each image: sources 0, 1
    pair_aspect = aspect.repeat_interleave(2)
    reference = torch.zeros_like(pair_sources)
    missing = torch.ones(len(pair_sources), dtype=torch.bool)
    while missing.any():
        rows = missing.nonzero().squeeze(1)
        draws = sample_crop_boxes(512 * len(rows), (0.05, 1.0), aspect=pair_aspect[rows].repeat_interleave(512),
                                  generator=generator).view(len(rows), 512, 4)
        iou = box_iou(pair_sources[rows].unsqueeze(1), draws)
        keys = torch.rand(iou.shape, generator=generator) * ((iou >= low) & (iou <= high))
        pick = keys.argmax(dim=1)
        fits = keys.max(dim=1).values > 0
        reference[rows[fits]] = draws[fits, pick[fits]]
        missing[rows[fits]] = False
    assert found.all()

    def area_and_log_ratio(boxes):
        w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        return (w * h).flatten(), (w / h).log().flatten()

    # 1200 pairs each: at a 0.1% level two samples of one distribution differ by less than 1.95 * sqrt(2 / 1200).
    bound = 1.95 * (2 / 1200) ** 0.5
    for ours, theirs in zip(area_and_log_ratio(targets), area_and_log_ratio(reference)):
        assert _ks_statistic(ours, theirs) < bound
    # The sources are RandomResizedCrop's own; the targets' area is tilted by the condition (documented).
    plain_area, _ = area_and_log_ratio(sources)
    assert _ks_statistic(area_and_log_ratio(targets)[0], plain_area) > bound


def test_targets_in_iou_range_report_pairs_whose_source_cannot_reach_the_range():
    # A whole-image source has IoU = area >= 0.05 with every crop of scale >= 0.05.
    sources = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.3, 0.3]]])
    _, found = sample_targets_in_iou_range(sources, 0.0, 0.04, (0.05, 1.0), generator=torch.Generator().manual_seed(0))
    assert found.tolist() == [[False, True]]


@pytest.mark.parametrize("low, high", [(0.6, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.0, 0.0)])
def test_targets_in_iou_range_reject_invalid_ranges(low, high):
    with pytest.raises(ConfigError, match="ab_iou_range"):
        sample_targets_in_iou_range(_random_boxes(1, 3), low, high, (0.05, 1.0))
