from __future__ import annotations

import pytest
import torch

from wildssl.data.boxes import (
    absolute_box,
    box_area,
    box_iou,
    discretize_box,
    flip_box_horizontally,
    relative_box,
)
from wildssl.data.views import crop_and_resize
from wildssl.errors import ConfigError


def random_boxes(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(n, 2, 2, generator=g, dtype=dtype)  # two random points per box
    low, high = corners.min(dim=1).values, corners.max(dim=1).values
    high = torch.maximum(high, low + 1e-3)  # keep widths non-zero
    return torch.cat((low, high), dim=1)


def test_relative_box_of_a_box_against_itself_is_the_unit_box():
    boxes = random_boxes(50, seed=0)
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).expand(50, 4)
    torch.testing.assert_close(relative_box(boxes, boxes), expected)


def test_relative_box_maps_points_like_an_independent_frame_change():
    src, tgt = random_boxes(40, seed=1), random_boxes(40, seed=2)
    rel = relative_box(src, tgt)
    for i in range(40):
        sx0, sy0, sx1, sy1 = src[i].tolist()
        tx0, ty0, tx1, ty1 = tgt[i].tolist()
        expected = [
            (tx0 - sx0) / (sx1 - sx0),
            (ty0 - sy0) / (sy1 - sy0),
            (tx1 - sx0) / (sx1 - sx0),
            (ty1 - sy0) / (sy1 - sy0),
        ]
        assert rel[i].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_absolute_box_inverts_relative_box_with_and_without_flips():
    src, tgt = random_boxes(64, seed=3), random_boxes(64, seed=4)
    flipped = torch.arange(64) % 2 == 0
    torch.testing.assert_close(absolute_box(src, relative_box(src, tgt)), tgt)
    torch.testing.assert_close(absolute_box(src, relative_box(src, tgt, flipped), flipped), tgt)
    # And the other way round: relative_box inverts absolute_box.
    rel = random_boxes(64, seed=5) * 3 - 1
    torch.testing.assert_close(relative_box(src, absolute_box(src, rel, flipped), flipped), rel)


def test_relative_box_in_a_flipped_frame_is_the_mirrored_relative_box():
    src, tgt = random_boxes(30, seed=6), random_boxes(30, seed=7)
    flipped = torch.ones(30, dtype=torch.bool)
    rel = relative_box(src, tgt)
    expected = torch.stack((1 - rel[:, 2], rel[:, 1], 1 - rel[:, 0], rel[:, 3]), dim=1)
    torch.testing.assert_close(relative_box(src, tgt, flipped), expected)
    torch.testing.assert_close(relative_box(src, tgt, ~flipped), rel)


def test_flip_box_horizontally_is_an_involution_and_mirrors_x():
    boxes = random_boxes(20, seed=8)
    flipped = flip_box_horizontally(boxes)
    torch.testing.assert_close(flipped[:, 0], 1 - boxes[:, 2])
    torch.testing.assert_close(flipped[:, 2], 1 - boxes[:, 0])
    torch.testing.assert_close(flipped[:, 1::2], boxes[:, 1::2])
    torch.testing.assert_close(flip_box_horizontally(flipped), boxes)


def grid_image(size: int) -> torch.Tensor:
    """(1, 3, size, size) image whose every pixel is distinct."""
    return torch.arange(3 * size * size, dtype=torch.float64).view(1, 3, size, size)


@pytest.mark.parametrize("src_flipped", [False, True])
def test_cropping_a_crop_to_the_relative_box_equals_cropping_the_image_to_the_target(src_flipped):
    # Sizes chosen so every crop is a 1:1 pixel copy: 16 px image, src spans 8 px, tgt spans 4 px.
    image = grid_image(16)
    src = torch.tensor([[0.25, 0.125, 0.75, 0.625]], dtype=torch.float64)
    tgt = torch.tensor([[0.3125, 0.25, 0.5625, 0.5]], dtype=torch.float64)
    flip = torch.tensor([src_flipped])
    src_view = crop_and_resize(image, src, 8, flip)
    rel = relative_box(src, tgt, flip)
    nested = crop_and_resize(src_view, rel, 4)
    direct = crop_and_resize(image, tgt, 4)
    expected = direct.flip(-1) if src_flipped else direct
    torch.testing.assert_close(nested, expected)
    # And the direct crop is the pixel slice the box names.
    torch.testing.assert_close(direct, image[:, :, 4:8, 5:9])


def brute_force_iou(a: list[float], b: list[float], resolution: int) -> float:
    """Count pixel centres of a resolution x resolution grid inside each box."""
    centres = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")

    def mask(box):
        return (xs >= box[0]) & (xs < box[2]) & (ys >= box[1]) & (ys < box[3])

    ma, mb = mask(a), mask(b)
    union = (ma | mb).sum().item()
    return (ma & mb).sum().item() / union if union else 0.0


def test_box_iou_matches_a_pixel_count_on_grid_aligned_boxes():
    g = torch.Generator().manual_seed(9)
    # Corners on multiples of 1/20 make the pixel count at resolution 40 exact.
    corners = torch.randint(0, 21, (60, 2, 2, 2), generator=g).double() / 20
    a = torch.cat((corners[:, 0].min(dim=1).values, corners[:, 0].max(dim=1).values), dim=1)
    b = torch.cat((corners[:, 1].min(dim=1).values, corners[:, 1].max(dim=1).values), dim=1)
    iou = box_iou(a, b)
    for i in range(60):
        assert iou[i].item() == pytest.approx(brute_force_iou(a[i].tolist(), b[i].tolist(), 40), abs=1e-12)


def test_box_iou_of_a_box_with_itself_is_one_and_of_disjoint_boxes_zero():
    boxes = random_boxes(25, seed=10)
    torch.testing.assert_close(box_iou(boxes, boxes), torch.ones(25, dtype=torch.float64))
    left = torch.tensor([0.0, 0.0, 0.4, 1.0])
    right = torch.tensor([0.5, 0.0, 1.0, 1.0])
    assert box_iou(left, right).item() == 0.0
    empty = torch.tensor([0.3, 0.3, 0.3, 0.3])
    assert box_iou(empty, empty).item() == 0.0


def test_box_iou_broadcasts_to_a_pairwise_matrix():
    a, b = random_boxes(4, seed=11), random_boxes(3, seed=12)
    matrix = box_iou(a[:, None], b[None])
    assert matrix.shape == (4, 3)
    torch.testing.assert_close(matrix[2, 1], box_iou(a[2], b[1]))


def test_box_area_is_width_times_height_and_zero_for_inverted_boxes():
    boxes = random_boxes(10, seed=13)
    expected = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    torch.testing.assert_close(box_area(boxes), expected)
    assert box_area(torch.tensor([0.6, 0.1, 0.2, 0.9])).item() == 0.0


def test_discretize_box_bins_clamps_and_keeps_shape():
    box = torch.tensor([[-5.0, -1.0, 0.49, 2.0], [0.5, 1.0, 1.99, 9.0]])
    bins = discretize_box(box, num_bins=6, value_range=(-1.0, 2.0))  # bins of width 0.5
    assert bins.dtype == torch.long and bins.shape == (2, 4)
    assert bins.tolist() == [[0, 0, 2, 5], [3, 4, 5, 5]]
    unit = discretize_box(torch.tensor([0.0, 0.26, 0.5, 1.0]), num_bins=4, value_range=(0.0, 1.0))
    assert unit.tolist() == [0, 1, 2, 3]


def test_discretize_box_rejects_an_empty_range():
    with pytest.raises(ConfigError, match="value_range"):
        discretize_box(torch.zeros(4), num_bins=8, value_range=(1.0, 1.0))


def test_boxes_given_as_lists_are_read_and_a_wrong_shape_is_one_line():
    """The Python API: relative_box([...], [...]) raised 'list indices must be integers'; a 3-number box an
    IndexError from deep inside."""
    assert relative_box([0.2, 0.2, 0.6, 0.6], [0.2, 0.2, 0.6, 0.6]).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert float(box_iou((0, 0, 1, 1), (0, 0, 0.5, 1))) == 0.5
    with pytest.raises(ConfigError, match=r"a box is \(x0, y0, x1, y1\): a \(\.\.\., 4\) tensor, got shape \(3,\)"):
        relative_box([0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="a box is"):
        box_iou(["a", "b", "c", "d"], [0, 0, 1, 1])
