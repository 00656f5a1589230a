from __future__ import annotations

import colorsys
import math

import pytest
import torch
import torch.nn.functional as F

from wildssl.data.photometric import (
    PIPELINES,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_pipeline,
    color_jitter,
    gaussian_blur,
    hsv_to_rgb,
    loses_colour,
    random_grayscale,
    rgb_to_hsv,
    solarize,
)
from wildssl.errors import ConfigError


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, size: int, seed: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    x = torch.rand(batch, 3, size, size, generator=generator(seed), dtype=torch.float64)
    return low + (high - low) * x


def luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


# --- colour spaces --------------------------------------------------------------------------------


def test_hsv_conversions_match_colorsys_and_round_trip():
    x = images(2, 5, seed=0)
    x[0, :, 0, 0] = torch.tensor([0.3, 0.3, 0.3])  # grey: hue and saturation 0
    x[0, :, 0, 1] = 0.0  # black
    x[0, :, 0, 2] = torch.tensor([0.8, 0.8, 0.2])  # ties between max channels
    hsv = rgb_to_hsv(x)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                expected = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                assert hsv[b, :, i, j].tolist() == pytest.approx(expected, abs=1e-12)
                back = colorsys.hsv_to_rgb(*hsv[b, :, i, j].tolist())
                assert hsv_to_rgb(hsv)[b, :, i, j].tolist() == pytest.approx(back, abs=1e-12)
    torch.testing.assert_close(hsv_to_rgb(hsv), x)


def test_hue_shift_rotates_hue_and_keeps_saturation_and_value():
    x = images(3, 6, seed=1)
    shift = torch.tensor([0.1, -0.25, 0.5], dtype=torch.float64)
    before, after = rgb_to_hsv(x), rgb_to_hsv(adjust_hue(x, shift))
    torch.testing.assert_close(after[:, 1:], before[:, 1:])
    turned = torch.remainder(after[:, 0] - before[:, 0] - shift.view(-1, 1, 1) + 0.5, 1.0) - 0.5
    torch.testing.assert_close(turned, torch.zeros_like(turned), atol=1e-9, rtol=0)


# --- colour jitter components ---------------------------------------------------------------------


def test_brightness_contrast_saturation_follow_torchvision_blend_formulas():
    x = images(2, 4, seed=2)
    factor = torch.tensor([0.6, 1.3], dtype=torch.float64)
    f = factor.view(-1, 1, 1, 1)
    torch.testing.assert_close(adjust_brightness(x, factor), (f * x).clamp(0, 1))
    mean_luma = luma(x).mean(dim=(1, 2)).view(-1, 1, 1, 1)
    torch.testing.assert_close(adjust_contrast(x, factor), (f * x + (1 - f) * mean_luma).clamp(0, 1))
    expected_saturation = (f * x + (1 - f) * luma(x).unsqueeze(1)).clamp(0, 1)
    torch.testing.assert_close(adjust_saturation(x, factor), expected_saturation)


def reference_jitter(x, brightness, contrast, saturation, hue, prob, seed):
    """Redraw color_jitter's documented random draws and apply the adjustments one sample at a time."""
    g = generator(seed)
    n = x.shape[0]
    applied = torch.rand(n, generator=g) < prob
    order = torch.rand(n, 4, generator=g).argsort(dim=1)
    factors = [
        max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * torch.rand(n, generator=g)
        for s in (brightness, contrast, saturation)
    ]
    shift = -hue + 2 * hue * torch.rand(n, generator=g)
    out = x.clone()
    for b in range(n):
        if not applied[b]:
            continue
        sample = x[b : b + 1]
        for op in order[b].tolist():
            if op == 3:
                sample = adjust_hue(sample, shift[b : b + 1])
            else:
                adjust = (adjust_brightness, adjust_contrast, adjust_saturation)[op]
                sample = adjust(sample, factors[op][b : b + 1])
        out[b] = sample[0]
    return out


def test_color_jitter_equals_per_sample_adjustments_in_a_per_sample_random_order():
    x = images(24, 5, seed=3)
    out = color_jitter(x, 0.8, 0.8, 0.8, 0.2, prob=0.8, generator=generator(4))
    torch.testing.assert_close(out, reference_jitter(x, 0.8, 0.8, 0.8, 0.2, 0.8, seed=4), atol=1e-9, rtol=0)
    assert (out >= 0).all() and (out <= 1).all()


def test_color_jitter_with_probability_zero_is_the_identity_and_skips_some_samples_at_one_half():
    x = images(40, 4, seed=5)
    assert torch.equal(color_jitter(x, 0.4, 0.4, 0.2, 0.1, prob=0.0, generator=generator(6)), x)
    out = color_jitter(x, 0.4, 0.4, 0.2, 0.1, prob=0.5, generator=generator(6))
    unchanged = (out == x).flatten(1).all(dim=1)
    assert 5 < unchanged.sum().item() < 35


def test_brightness_only_jitter_scales_each_image_by_one_factor_in_range():
    x = images(16, 4, seed=7, low=0.2, high=0.6)  # no clamping for factors up to 1.4
    out = color_jitter(x, 0.4, 0.0, 0.0, 0.0, prob=1.0, generator=generator(8))
    ratio = (out / x).flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert ratio.min() >= 0.6 - 1e-9 and ratio.max() <= 1.4 + 1e-9
    assert ratio[:, 0].std() > 0.05  # per-sample factors


def test_saturation_only_jitter_keeps_luma_without_clamping():
    x = images(8, 4, seed=9, low=0.3, high=0.7)
    out = color_jitter(x, 0.0, 0.0, 0.2, 0.0, prob=1.0, generator=generator(10))
    torch.testing.assert_close(luma(out), luma(x))
    assert not torch.allclose(out, x)


# --- grayscale, blur, solarize --------------------------------------------------------------------


def test_grayscale_gives_equal_channels_equal_to_luma():
    x = images(5, 6, seed=11)
    out = random_grayscale(x, 1.0, generator(12))
    torch.testing.assert_close(out[:, 0], luma(x))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert torch.equal(random_grayscale(x, 0.0, generator(12)), x)


def test_keep_colour_never_moves_the_hue_of_a_saturated_pixel_where_simclr_cifar_does():
    hues = torch.linspace(0.02, 0.98, 64, dtype=torch.float64)
    # Channels in [0.25, 0.5]: no jitter factor in [0.6, 1.4] pushes them past 0 or 1, where a clamp would move the
    # hue. Brightness, contrast and saturation scale a pixel and add grey, which keeps its hue.
    hsv = torch.stack([hues, torch.full_like(hues, 0.5), torch.full_like(hues, 0.5)])  # (3, 64)
    x = hsv_to_rgb(hsv.T.reshape(64, 3, 1, 1).expand(64, 3, 2, 2).contiguous())

    def hue_moved(name: str) -> torch.Tensor:  # per image: the hue moved by more than rounding (circular)
        out = apply_pipeline(name, x, generator(5))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        moved = (rgb_to_hsv(out)[:, 0, 0, 0] - hues).abs()
        return torch.minimum(moved, 1 - moved) > 1e-6

    assert not hue_moved("keep_colour").any()
    assert hue_moved("simclr_cifar").sum() >= 32  # hue jitter (p = 0.8 x hue != 0) or grey views on most images


def test_solarize_inverts_pixels_at_or_above_the_threshold():
    x = images(4, 6, seed=13)
    x[:, 0, 0, 0] = 0.3
    out = solarize(x, 1.0, generator(14))
    torch.testing.assert_close(out, torch.where(x >= 0.5, 1 - x, x))
    at_threshold = solarize(x, 1.0, generator(14), threshold=0.3)
    assert at_threshold[:, 0, 0, 0].tolist() == pytest.approx([0.7] * 4)
    half = solarize(x, 0.5, generator(15), threshold=0.3)
    for b in range(4):
        assert torch.equal(half[b], x[b]) or torch.equal(half[b], torch.where(x[b] >= 0.3, 1 - x[b], x[b]))


def reference_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Full 2-D Gaussian convolution with reflect padding, float64."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    weights = (weights / weights.sum()).expand(x.shape[1], 1, -1, -1)
    padded = F.pad(x, (radius,) * 4, mode="reflect")
    return F.conv2d(padded, weights, groups=x.shape[1])


def test_blur_with_fixed_sigma_matches_a_2d_gaussian_convolution():
    x = images(2, 40, seed=16)  # kernel of 10% of 40 px: radius 2
    out = gaussian_blur(x, 1.0, generator(17), sigma=(1.3, 1.3))
    torch.testing.assert_close(out, reference_blur(x, 1.3, radius=2))


def test_blur_keeps_a_constant_image_and_varies_sigma_per_sample():
    constant = torch.full((6, 3, 20, 20), 0.37, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(constant, 1.0, generator(18)), constant)
    same = images(1, 30, seed=19).expand(6, -1, -1, -1).contiguous()
    out = gaussian_blur(same, 1.0, generator(20))
    differences = [(out[0] - out[b]).abs().max().item() for b in range(1, 6)]
    assert min(differences) > 1e-4
    assert torch.equal(gaussian_blur(same, 0.0, generator(20)), same)


@pytest.mark.parametrize("step", ["blur", "grayscale"])
def test_a_step_at_probability_zero_returns_its_input_and_draws_what_it_draws_at_any_probability(step):
    # simclr_cifar and keep_colour have no blur (keep_colour no grey views either): those steps return their input
    # without computing a result that would be thrown away, but still draw their random numbers, so that the draws
    # after them (the next crop group's) do not depend on the step's probability.
    apply = {"blur": gaussian_blur, "grayscale": random_grayscale}[step]
    x = images(5, 12, seed=24)
    never, sometimes = generator(25), generator(25)
    assert torch.equal(apply(x, 0.0, never), x)
    apply(x, 0.5, sometimes)
    assert torch.equal(torch.rand(8, generator=never), torch.rand(8, generator=sometimes))


def test_pipelines_without_blur_or_grey_views_apply_exactly_their_jitter():
    x = images(6, 12, seed=26).float()
    cifar, keep = PIPELINES["simclr_cifar"], PIPELINES["keep_colour"]
    drawn = generator(27)
    jittered = color_jitter(x, *cifar.jitter, prob=cifar.jitter_prob, generator=drawn)
    expected = random_grayscale(jittered, cifar.grayscale_prob, drawn)
    assert torch.equal(apply_pipeline("simclr_cifar", x, generator(27)), expected)
    assert torch.equal(apply_pipeline("keep_colour", x, generator(27)),
                       color_jitter(x, *keep.jitter, prob=keep.jitter_prob, generator=generator(27)))


# --- pipelines ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipelines_are_reproducible_per_seed_and_stay_in_range(name):
    x = images(6, 16, seed=21).float()
    a = apply_pipeline(name, x, generator(22))
    b = apply_pipeline(name, x, generator(22))
    c = apply_pipeline(name, x, generator(23))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and (a >= 0).all() and (a <= 1).all()


def test_pipelines_use_the_papers_parameters():
    assert PIPELINES["simclr"].jitter == (0.8, 0.8, 0.8, 0.2)
    assert (PIPELINES["simclr"].blur_prob, PIPELINES["simclr"].solarize_prob) == (0.5, 0.0)
    blur = {name: PIPELINES[name].blur_prob for name in ("dino_global1", "dino_global2", "dino_local")}
    assert blur == {"dino_global1": 1.0, "dino_global2": 0.1, "dino_local": 0.5}
    assert PIPELINES["dino_global2"].solarize_prob == 0.2
    papers = {name: p for name, p in PIPELINES.items() if name != "keep_colour"}  # keep_colour is ours, below
    assert all(p.jitter_prob == 0.8 and p.grayscale_prob == 0.2 for p in papers.values())
    # SimCLR's CIFAR-10 setting (appendix B.9): colour strength s = 0.5 of (0.8, 0.8, 0.8, 0.2), no blur.
    assert PIPELINES["simclr_cifar"].jitter == tuple(0.5 * s for s in PIPELINES["simclr"].jitter)
    assert (PIPELINES["simclr_cifar"].blur_prob, PIPELINES["simclr_cifar"].solarize_prob) == (0.0, 0.0)
    # keep_colour: simclr_cifar without its hue jitter and grey views.
    cifar, keep = PIPELINES["simclr_cifar"], PIPELINES["keep_colour"]
    assert keep.jitter == cifar.jitter[:3] + (0.0,) and keep.grayscale_prob == 0.0
    assert (keep.jitter_prob, keep.blur_prob, keep.solarize_prob) == (cifar.jitter_prob, 0.0, 0.0)


def test_a_pipeline_without_blur_keeps_a_sharp_edge_that_the_blurring_one_smooths():
    x = torch.zeros(32, 3, 16, 16)
    x[:, :, :, 8:] = 1.0  # a vertical edge; jitter and grayscale act per pixel and keep it a step
    sharp = apply_pipeline("simclr_cifar", x, generator(30))
    blurred = apply_pipeline("simclr", x, generator(30))

    def smoothed(y):  # images with a column strictly between the two sides of the edge
        middle = y[:, :, :, 6:10]
        low, high = y[:, :, :, :1], y[:, :, :, -1:]
        strictly_between = (middle > torch.minimum(low, high) + 1e-4) & (middle < torch.maximum(low, high) - 1e-4)
        return strictly_between.flatten(1).any(dim=1)

    assert not smoothed(sharp).any()
    assert smoothed(blurred).any()


def test_unknown_pipeline_raises_a_config_error():
    with pytest.raises(ConfigError, match="simclr"):
        apply_pipeline("byol", torch.rand(1, 3, 4, 4), generator(0))


def test_blur_kernel_spans_ten_percent_of_the_image_side():
    # The SimCLR blur kernel for 224 px images has 23 taps (radius 11).
    x = torch.zeros(1, 3, 224, 224, dtype=torch.float64)
    x[0, :, 112, 112] = 1.0
    out = gaussian_blur(x, 1.0, generator(24), sigma=(50.0, 50.0))  # near-flat kernel shows its extent
    row = out[0, 0, 112]
    support = (row > 0).nonzero().flatten()
    assert support.min().item() == 112 - 11 and support.max().item() == 112 + 11
    assert math.isclose(out.sum().item(), 3.0, rel_tol=1e-9)


def test_loses_colour_says_which_pipelines_shift_hue_or_grey_their_views_out():
    """Checked on the views themselves: a reddish image with G == B keeps hue 0 under brightness, contrast,
    saturation and blur; hue jitter makes G != B, grey views make R == G == B."""
    x = torch.tensor([0.8, 0.3, 0.3]).view(1, 3, 1, 1).expand(256, 3, 8, 8).contiguous()
    for name in PIPELINES:
        out = apply_pipeline(name, x, torch.Generator().manual_seed(0))
        r, g, b = out[:, 0, 0, 0], out[:, 1, 0, 0], out[:, 2, 0, 0]
        lost = ((g - b).abs() > 1e-4) | (((r - g).abs() < 1e-4) & ((g - b).abs() < 1e-4))
        assert bool(lost.any()) == loses_colour(name), name
    assert {name for name in PIPELINES if not loses_colour(name)} == {"keep_colour"}
    assert loses_colour("dino") and not loses_colour("no such pipeline")
