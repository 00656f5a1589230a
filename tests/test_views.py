from __future__ import annotations

import math

import pytest
import torch

from wildssl.data.boxes import box_area
from wildssl.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSpec,
    crop_and_resize,
    dino_specs,
    make_views,
    sample_crop_boxes,
    simclr_specs,
)
from wildssl.errors import ConfigError, DataError


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- sample_crop_boxes ----------------------------------------------------------------------------


def pixel_ratio(boxes: torch.Tensor, aspect: torch.Tensor) -> torch.Tensor:
    """Width / height of the boxes in pixels of an original image whose W/H is ``aspect``."""
    return (boxes[:, 2] - boxes[:, 0]) * aspect / (boxes[:, 3] - boxes[:, 1])


def test_crop_boxes_lie_inside_the_image_with_area_and_pixel_ratio_in_range():
    n = 3000
    aspect = 0.6 + 1.2 * torch.rand(n, generator=generator(0))
    # For these aspects every candidate fits (wn, hn <= 1), so no box is a fallback.
    boxes = sample_crop_boxes(n, (0.05, 0.4), (3 / 4, 4 / 3), aspect, generator(1))
    assert boxes.shape == (n, 4) and boxes.dtype == torch.float32
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    area = box_area(boxes.double())
    assert area.min() >= 0.05 - 1e-5 and area.max() <= 0.4 + 1e-5
    ratio = pixel_ratio(boxes.double(), aspect.double())
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4


def test_crop_boxes_with_torchvision_defaults_keep_the_first_candidate_that_fits():
    # With scale (0.08, 1) many first candidates stick out of the image; the kept one must fit, and
    # the centre-crop fallback of these aspects (0.5..2) also has its area and ratio in range.
    n = 3000
    aspect = torch.exp(math.log(2) * (2 * torch.rand(n, generator=generator(30)) - 1))
    boxes = sample_crop_boxes(n, aspect=aspect, generator=generator(31)).double()
    area = box_area(boxes)
    assert area.min() >= 0.08 - 1e-5 and area.max() <= 1 + 1e-6
    ratio = pixel_ratio(boxes, aspect.double())
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    centred = (boxes[:, 0] + boxes[:, 2] - 1).abs() + (boxes[:, 1] + boxes[:, 3] - 1).abs() < 1e-6
    assert centred.float().mean() < 0.02  # fallbacks are rare: 10 candidates are tried


def test_crop_box_area_log_ratio_and_position_are_uniform():
    n = 4000
    boxes = sample_crop_boxes(n, (0.05, 0.4), (3 / 4, 4 / 3), generator=generator(2)).double()
    area = box_area(boxes)
    assert area.mean().item() == pytest.approx(0.225, abs=0.01)  # mean of U(0.05, 0.4)
    log_ratio = pixel_ratio(boxes, torch.ones(n, dtype=torch.float64)).log()
    assert log_ratio.mean().item() == pytest.approx(0.0, abs=0.01)  # log(3/4) = -log(4/3)
    assert log_ratio.std().item() == pytest.approx(2 * math.log(4 / 3) / math.sqrt(12), rel=0.05)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    for offset, free in ((boxes[:, 0], 1 - width), (boxes[:, 1], 1 - height)):
        fraction = offset / free  # uniform in [0, 1] if the position is uniform among valid ones
        assert fraction.mean().item() == pytest.approx(0.5, abs=0.02)
        assert fraction.min() >= 0 and fraction.max() <= 1 + 1e-5


def test_crop_boxes_of_wide_images_sample_pixel_ratios_not_normalized_ratios():
    n = 2000
    aspect = torch.full((n,), 2.0)
    boxes = sample_crop_boxes(n, (0.2, 0.3), (1.0, 1.0), aspect, generator(3)).double()
    # Square in pixels of a 2:1 image: normalized width is half the normalized height.
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    torch.testing.assert_close(width * 2, height, rtol=1e-5, atol=1e-6)


def test_crop_boxes_fall_back_to_a_centre_crop_with_the_ratio_clamped():
    # On a 2:1 image a square pixel crop of >= 90% area never fits; torchvision then takes the
    # largest centred crop whose pixel ratio is the image's clamped into range: here 1:1.
    boxes = sample_crop_boxes(8, (0.9, 1.0), (1.0, 1.0), torch.full((8,), 2.0), generator(4))
    expected = torch.tensor([0.25, 0.0, 0.75, 1.0]).expand(8, 4)
    torch.testing.assert_close(boxes, expected)
    tall = sample_crop_boxes(4, (0.95, 1.0), (3 / 4, 4 / 3), torch.full((4,), 0.5), generator(4))
    # W/H = 0.5 < 3/4: full width, height so that the pixel ratio is 3/4 -> 0.5 / 0.75 of the height.
    torch.testing.assert_close(tall, torch.tensor([0.0, 1 / 6, 1.0, 5 / 6]).expand(4, 4))


def test_crop_boxes_are_reproducible_per_seed_and_differ_across_seeds():
    a = sample_crop_boxes(16, generator=generator(5))
    b = sample_crop_boxes(16, generator=generator(5))
    c = sample_crop_boxes(16, generator=generator(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_crop_sampling_rejects_invalid_ranges():
    with pytest.raises(ConfigError, match="scale"):
        sample_crop_boxes(2, scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="ratio"):
        CropSpec(size=8, scale=(0.2, 0.5), ratio=(0.0, 1.0))
    with pytest.raises(ConfigError, match="photometric"):
        CropSpec(size=8, scale=(0.2, 0.5), photometric="byol")


# --- crop_and_resize ------------------------------------------------------------------------------


def random_images(batch: int, size: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=generator(seed), dtype=dtype)


def test_crop_of_the_full_box_at_the_same_size_is_the_image():
    images = random_images(3, 10, seed=7)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64).expand(3, 4)
    torch.testing.assert_close(crop_and_resize(images, full, 10), images)


def test_flipped_crop_is_the_mirrored_crop():
    images = random_images(4, 12, seed=8)
    boxes = torch.tensor(
        [[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0], [0.3, 0.1, 0.6, 0.5], [0.5, 0.5, 1.0, 1.0]]
    )
    flip = torch.tensor([True, True, False, True])
    plain = crop_and_resize(images, boxes, (5, 7))
    flipped = crop_and_resize(images, boxes, (5, 7), flip)
    expected = torch.where(flip.view(-1, 1, 1, 1), plain.flip(-1), plain)
    torch.testing.assert_close(flipped, expected)


def test_crop_of_a_quadrant_at_matching_size_is_the_pixel_slice():
    images = random_images(2, 8, seed=9)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 0.75]])
    out = crop_and_resize(images, boxes, 4)
    torch.testing.assert_close(out[0], images[0, :, 0:4, 0:4])
    torch.testing.assert_close(out[1], images[1, :, 2:6, 4:8])
    # Non-square output: a 2 x 4 pixel box.
    strip = crop_and_resize(images, torch.tensor([[0.25, 0.5, 0.75, 0.75]]).expand(2, 4), (2, 4))
    torch.testing.assert_close(strip, images[:, :, 4:6, 2:6])


def reference_bilinear_crop(image: torch.Tensor, box: list[float], h: int, w: int) -> torch.Tensor:
    """Independent bilinear resampling of output pixel centres, edges replicated (float64 loops)."""
    channels, height, width = image.shape
    x0, y0, x1, y1 = box
    out = torch.empty(channels, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            # Normalized position -> continuous pixel index (pixel k has its centre at k).
            px = (x0 + (j + 0.5) / w * (x1 - x0)) * width - 0.5
            py = (y0 + (i + 0.5) / h * (y1 - y0)) * height - 0.5
            px, py = min(max(px, 0.0), width - 1.0), min(max(py, 0.0), height - 1.0)
            left, top = math.floor(px), math.floor(py)
            right, bottom = min(left + 1, width - 1), min(top + 1, height - 1)
            fx, fy = px - left, py - top
            out[:, i, j] = (
                image[:, top, left] * (1 - fx) * (1 - fy)
                + image[:, top, right] * fx * (1 - fy)
                + image[:, bottom, left] * (1 - fx) * fy
                + image[:, bottom, right] * fx * fy
            )
    return out


def test_crop_matches_an_independent_bilinear_resampling():
    images = random_images(3, 9, seed=10)
    boxes = torch.tensor(
        [[0.13, 0.07, 0.71, 0.93], [0.0, 0.41, 0.33, 1.0], [0.55, 0.0, 1.0, 0.29]], dtype=torch.float64
    )
    out = crop_and_resize(images, boxes, (5, 6))
    for b in range(3):
        expected = reference_bilinear_crop(images[b], boxes[b].tolist(), 5, 6)
        torch.testing.assert_close(out[b], expected, rtol=1e-9, atol=1e-9)


def test_several_crops_per_image_equal_separate_crops():
    images = random_images(2, 10, seed=11)
    boxes = sample_crop_boxes(6, generator=generator(12)).double().view(2, 3, 4)
    flip = torch.tensor([[True, False, True], [False, False, True]])
    together = crop_and_resize(images, boxes, 4, flip)
    assert together.shape == (2, 3, 3, 4, 4)
    for k in range(3):
        torch.testing.assert_close(together[:, k], crop_and_resize(images, boxes[:, k], 4, flip[:, k]))


# --- make_views -----------------------------------------------------------------------------------


def uint8_images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator(seed), dtype=torch.uint8)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def test_whole_image_view_without_augmentation_is_the_normalized_image():
    images = uint8_images(3, 8, seed=13)
    spec = CropSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
    (view,) = make_views(images, [spec], generator(14))
    torch.testing.assert_close(view.boxes, torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(3, 4))
    assert not view.flipped.any()
    torch.testing.assert_close(view.images, normalize(images.float() / 255), rtol=1e-5, atol=1e-5)
    assert torch.equal(view.source_index, torch.arange(3))

    mirror_spec = CropSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    (mirrored,) = make_views(images, [mirror_spec], generator(14))
    assert mirrored.flipped.all()
    torch.testing.assert_close(mirrored.images, view.images.flip(-1), rtol=1e-5, atol=1e-5)


def test_views_show_the_crops_their_boxes_and_flips_describe():
    images = uint8_images(4, 16, seed=15)
    specs = [CropSpec(size=6, scale=(0.2, 0.6))] * 2 + [CropSpec(size=4, scale=(0.1, 0.3))]
    views = make_views(images, specs, generator(16))
    assert [tuple(v.images.shape) for v in views] == [(4, 3, 6, 6), (4, 3, 6, 6), (4, 3, 4, 4)]
    pixels = images.float() / 255
    for view, spec in zip(views, specs):
        expected = normalize(crop_and_resize(pixels, view.boxes, spec.size, view.flipped))
        torch.testing.assert_close(view.images, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(views[0].boxes, views[1].boxes)  # grouped identical specs still differ


def test_make_views_is_bit_identical_for_a_seed_and_differs_across_seeds():
    images = uint8_images(2, 32, seed=17)
    specs = dino_specs(global_size=16, local_size=8, n_local=2)
    first = make_views(images, specs, generator(18))
    second = make_views(images, specs, generator(18))
    other = make_views(images, specs, generator(19))
    for a, b, c in zip(first, second, other):
        assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
        assert torch.equal(a.flipped, b.flipped)
        assert not torch.equal(a.images, c.images)


def test_dino_and_simclr_specs_follow_the_papers():
    dino = dino_specs(224, 96, 8)
    assert [s.photometric for s in dino] == ["dino_global1", "dino_global2"] + ["dino_local"] * 8
    assert [s.size for s in dino] == [224, 224] + [96] * 8
    assert dino[0].scale == (0.4, 1.0) and dino[2].scale == (0.05, 0.4)
    simclr = simclr_specs(32)
    assert len(simclr) == 2 and all(s.scale == (0.08, 1.0) and s.photometric == "simclr" for s in simclr)
    assert all(s.flip_prob == 0.5 for s in dino + simclr)


def test_make_views_rejects_float_images():
    with pytest.raises(DataError, match="uint8"):
        make_views(torch.rand(2, 3, 8, 8), simclr_specs(8), generator(0))
