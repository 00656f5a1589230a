"""Photometric augmentation of SimCLR and DINO, batched on the device with per-sample randomness.

Images are float ``(B, 3, H, W)`` in [0, 1]. Every random choice (apply or not, jitter factors, blur
sigma, jitter order) is drawn per sample from an explicit ``torch.Generator``: on the generator's own
device, then moved to the images' device, so a CPU generator gives the same draws whatever device the
images are on. No torchvision or kornia: the operations follow torchvision's definitions.

Pipelines (``PIPELINES``, applied by :func:`apply_pipeline` in the papers' order: colour jitter,
grayscale, blur, solarize; flips and crops live in :mod:`wildssl.data.views`):

- ``simclr``: SimCLR (Chen et al. 2020, appendix A) with colour strength s = 1: jitter
  (0.8, 0.8, 0.8, 0.2) with p = 0.8, grayscale p = 0.2, blur p = 0.5 with sigma in [0.1, 2.0].
- ``simclr_cifar``: SimCLR's CIFAR-10 setting (appendix B.9) for small images: colour strength s = 0.5,
  jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, no blur.
- ``keep_colour``: ``simclr_cifar`` without its hue jitter and grayscale (brightness, contrast and saturation
  jitter only), for data whose classes are told apart by their colour. Measured with ``dino_quick``
  (``benchmarks/demo.md``, twelfth round): on Flickr8k scenes (snow, water, grass, ...) +3.7 / +2.7 k-NN points
  over random init in 5 folds against -1.0 / -2.1 with ``simclr_cifar``, but on 1,700 CIFAR-10 images +1.1 / -1.1
  against +6.8 / +5.0, and on CamVid street objects +12.6 / +11.9 against +18.8 / +17.7: without hue and grey
  views the features learn colour, which objects do not share. The quick recipes keep ``simclr_cifar``.
- ``dino_global1`` / ``dino_global2`` / ``dino_local``: DINO (Caron et al. 2021, ``main_dino.py``
  ``DataAugmentationDINO``): jitter (0.4, 0.4, 0.2, 0.1) p = 0.8 and grayscale p = 0.2 everywhere;
  blur p = 1.0 on the first global crop, p = 0.1 plus solarize p = 0.2 on the second, p = 0.5 on the
  local crops.
- ``simsiam``: SimSiam (Chen & He 2021), i.e. MoCo v2's: jitter (0.4, 0.4, 0.4, 0.1) p = 0.8, grayscale
  p = 0.2, blur p = 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wildssl.errors import ConfigError

# ITU-R 601-2 luma, as PIL's "L" conversion; the weights sum to 1 so grey images stay unchanged.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws made on the generator's device (for reproducibility), then moved."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return low + (high - low) * _rand((n,), generator, device)


def _coin(n: int, prob: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(n,)`` bool, True with probability ``prob``."""
    return _rand((n,), generator, device) < prob


def _per_sample(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


def _check_prob(prob: float, what: str) -> None:
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"photometric {what}: probability {prob} is outside [0, 1]")


# --- colour-space conversions (pure) -------------------------------------------------------------


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of ``x`` ``(B, 3, H, W)`` -> ``(B, 1, H, W)`` with ``LUMA_WEIGHTS``."""
    r, g, b = x.unbind(dim=1)
    wr, wg, wb = LUMA_WEIGHTS
    return (wr * r + wg * g + wb * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in [0, 1] -> HSV with every channel in [0, 1] (hue as a fraction of a turn).

    Same convention as Python's ``colorsys``: hue 0 and saturation 0 for grey pixels, value = max.
    """
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1)
    delta = value - x.amin(dim=1)
    saturation = torch.where(value > 0, delta / torch.where(value > 0, value, 1.0), 0.0)
    safe_delta = torch.where(delta > 0, delta, 1.0)
    rc, gc, bc = (value - r) / safe_delta, (value - g) / safe_delta, (value - b) / safe_delta
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), 0.0)
    return torch.stack((hue, saturation, value), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: HSV ``(B, 3, H, W)`` -> RGB.

    Uses the closed form ``c_n = v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6`` with
    n = 5, 3, 1 for R, G, B, which needs no per-sector branching.
    """
    hue, saturation, value = x.unbind(dim=1)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * hue, 6.0)
        channels.append(value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


# --- colour jitter components, each with a per-sample factor (B,) (pure) --------------------------


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``clamp(factor * x + (1 - factor) * other, 0, 1)``, ``factor`` ``(B,)``."""
    factor = factor.to(x.dtype).view(-1, 1, 1, 1)
    return torch.lerp(other.to(x.dtype).expand_as(x), x, factor).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale intensities by ``factor`` ``(B,)`` (blend with black)."""
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma (one grey level per image)."""
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's own per-pixel luma."""
    return _blend(x, rgb_to_gray(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` ``(B,)`` turns (in [-0.5, 0.5]) in HSV space, as torchvision does."""
    hue, saturation, value = rgb_to_hsv(x).unbind(dim=1)
    hue = torch.remainder(hue + shift.to(x.dtype).view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((hue, saturation, value), dim=1))


# --- random augmentations -------------------------------------------------------------------------


# Operation ids in the jitter order; brightness, contrast and saturation are all blends (see _blend).
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3
_NO_OP = -1


def _blend_step(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per sample, the brightness, contrast or saturation blend named by ``op`` ``(B,)``, or nothing
    (``_NO_OP``: factor 1 against 0, which returns ``x`` exactly); ``factors`` ``(B, 3)``."""
    factor = torch.where(op == _NO_OP, 1.0, factors.gather(1, op.clamp(min=0).unsqueeze(1)).squeeze(1))
    gray = rgb_to_gray(x)
    other = torch.where(
        _per_sample(op == _SATURATION),
        gray,
        torch.where(_per_sample(op == _CONTRAST), gray.mean(dim=(1, 2, 3), keepdim=True), 0.0),
    )
    return _blend(x, other, factor)


def color_jitter(
    x: torch.Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    prob: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """torchvision ``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p=prob)``.

    ``x`` ``(B, 3, H, W)`` in [0, 1] -> same shape. Per sample, drawn in this order: whether to apply
    (probability ``prob``); a uniformly random order of the four adjustments (``argsort`` of four
    uniforms; 0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision draws per image; the
    brightness, contrast and saturation factors from ``[max(0, 1 - s), 1 + s]``; the hue shift from
    ``[-hue, hue]``. Equivalent to applying :func:`adjust_brightness` etc. one sample at a time in that
    order. Batched without host synchronisation: the blends before the hue shift run as three
    per-sample-selected blend steps, then one hue shift, then three more blend steps (a sample with
    fewer blends on one side gets exact no-ops), so the costly HSV round trip runs once.
    """
    _check_prob(prob, "colour jitter")
    if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
        raise ConfigError(
            f"colour jitter strengths ({brightness}, {contrast}, {saturation}, {hue}) invalid; "
            "need brightness, contrast, saturation >= 0 and 0 <= hue <= 0.5"
        )
    batch, device = x.shape[0], x.device
    applied = _coin(batch, prob, generator, device)
    order = _rand((batch, 4), generator, device).argsort(dim=1)
    factors = torch.stack(
        [
            _uniform(batch, max(0.0, 1.0 - strength), 1.0 + strength, generator, device)
            for strength in (brightness, contrast, saturation)
        ],
        dim=1,
    )
    shift = _uniform(batch, -hue, hue, generator, device)

    hue_step = (order == _HUE).to(torch.uint8).argmax(dim=1)
    for step in range(3):
        before_hue = applied & (step < hue_step)
        x = _blend_step(x, torch.where(before_hue, order[:, step], _NO_OP), factors)
    if hue > 0:
        x = torch.where(_per_sample(applied), adjust_hue(x, shift), x)
    for offset in range(1, 4):
        step = hue_step + offset
        after_hue = applied & (step < 4)
        op = order.gather(1, step.clamp(max=3).unsqueeze(1)).squeeze(1)
        x = _blend_step(x, torch.where(after_hue, op, _NO_OP), factors)
    return x


def random_grayscale(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """With probability ``prob`` per sample, replace all three channels by the luma. ``(B, 3, H, W)``."""
    _check_prob(prob, "grayscale")
    applied = _coin(x.shape[0], prob, generator, x.device)
    if prob == 0:  # keep_colour: nothing to grey out (the coins are drawn all the same, as for the blur)
        return x
    return torch.where(_per_sample(applied), rgb_to_gray(x).expand_as(x), x)


def _blur_radius(side: int) -> int:
    # SimCLR: kernel ~10% of the image side (23 taps at 224), odd; reflect padding needs radius < side.
    return max(1, min(int(0.1 * side) // 2, side - 1))


def _gaussian_kernels(sigma: torch.Tensor, radius: int, dtype: torch.dtype) -> torch.Tensor:
    """Normalized 1-D Gaussian kernels ``(B, 2 * radius + 1)`` for per-sample ``sigma`` ``(B,)``."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=dtype)
    kernels = torch.exp(-(offsets**2) / (2.0 * sigma.to(dtype).unsqueeze(1) ** 2))
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(
    x: torch.Tensor,
    prob: float,
    generator: torch.Generator,
    sigma: tuple[float, float] = (0.1, 2.0),
) -> torch.Tensor:
    """With probability ``prob`` per sample, Gaussian blur with sigma ~ U(``sigma``) pixels.

    ``(B, C, H, W)`` -> same shape. Kernel of ~10% of each side (odd), reflect padding (torchvision's).
    Separable: one grouped convolution per axis with a kernel per sample (``groups = B * C``).
    """
    _check_prob(prob, "blur")
    if not 0 < sigma[0] <= sigma[1]:
        raise ConfigError(f"gaussian blur: sigma range {sigma} invalid; need 0 < low <= high")
    batch, channels, height, width = x.shape
    applied = _coin(batch, prob, generator, x.device)
    sigmas = _uniform(batch, sigma[0], sigma[1], generator, x.device)
    if prob == 0:  # drawn all the same, so the generator moves as it does at any probability
        return x  # the convolutions would be thrown away (simclr_cifar, keep_colour: a quarter of their pipeline's time)
    radius_h, radius_w = _blur_radius(height), _blur_radius(width)
    groups = batch * channels
    kernel_h = _gaussian_kernels(sigmas, radius_h, x.dtype).repeat_interleave(channels, dim=0)
    kernel_w = _gaussian_kernels(sigmas, radius_w, x.dtype).repeat_interleave(channels, dim=0)
    y = x.reshape(1, groups, height, width)
    y = F.pad(y, (0, 0, radius_h, radius_h), mode="reflect")
    y = F.conv2d(y, kernel_h.view(groups, 1, -1, 1), groups=groups)
    y = F.pad(y, (radius_w, radius_w, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel_w.view(groups, 1, 1, -1), groups=groups)
    return torch.where(_per_sample(applied), y.view_as(x), x)


def solarize(
    x: torch.Tensor, prob: float, generator: torch.Generator, threshold: float = 0.5
) -> torch.Tensor:
    """With probability ``prob`` per sample, invert pixels ``>= threshold``: ``x -> 1 - x`` (PIL's rule)."""
    _check_prob(prob, "solarize")
    applied = _coin(x.shape[0], prob, generator, x.device)
    return torch.where(_per_sample(applied) & (x >= threshold), 1.0 - x, x)


# --- pipelines ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    """Probabilities and strengths of one paper's photometric augmentation."""

    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    jitter_prob: float
    grayscale_prob: float
    blur_prob: float
    solarize_prob: float = 0.0


_DINO_JITTER = (0.4, 0.4, 0.2, 0.1)

PIPELINES: dict[str, Pipeline] = {
    "simclr": Pipeline(jitter=(0.8, 0.8, 0.8, 0.2), jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5),
    # At 32 px a blur kernel of 10% of the side smears a crop that holds little detail to begin with.
    "simclr_cifar": Pipeline(jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.0),
    # simclr_cifar without hue jitter and grayscale: colour kept as a cue (see the module docstring).
    "keep_colour": Pipeline(jitter=(0.4, 0.4, 0.4, 0.0), jitter_prob=0.8, grayscale_prob=0.0, blur_prob=0.0),
    "dino_global1": Pipeline(jitter=_DINO_JITTER, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=1.0),
    "dino_global2": Pipeline(
        jitter=_DINO_JITTER, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.1, solarize_prob=0.2
    ),
    "dino_local": Pipeline(jitter=_DINO_JITTER, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5),
    # SimSiam (Chen & He 2021, Sec. 4) uses MoCo v2's augmentation: weaker jitter than SimCLR's.
    "simsiam": Pipeline(jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5),
}


# The pipelines of DINO's multi-crop (``method.photometric=dino``): first global, second global, local crops.
DINO_PIPELINES = ("dino_global1", "dino_global2", "dino_local")


def loses_colour(name: str) -> bool:
    """Whether pipeline ``name`` (``dino``: :data:`DINO_PIPELINES`) jitters hue or greys views out, so that an
    encoder trained on its views learns to ignore colour. False for a name that is no pipeline."""
    names = DINO_PIPELINES if name == "dino" else (name,)
    return any(n in PIPELINES and (PIPELINES[n].jitter[3] > 0 or PIPELINES[n].grayscale_prob > 0) for n in names)


def check_pipeline(name: str, where: str) -> str:
    """``name`` if it is a pipeline of :data:`PIPELINES`, else a one-line ConfigError naming ``where``."""
    if name not in PIPELINES:
        raise ConfigError(f"{where}={name!r} is not a photometric pipeline; choose one of {', '.join(sorted(PIPELINES))}")
    return name


def apply_pipeline(name: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply the pipeline ``PIPELINES[name]`` to ``x`` ``(B, 3, H, W)`` in [0, 1]; returns the same shape."""
    if name not in PIPELINES:
        raise ConfigError(f"photometric pipeline {name!r} is unknown; choose one of {sorted(PIPELINES)}")
    pipeline = PIPELINES[name]
    x = color_jitter(x, *pipeline.jitter, prob=pipeline.jitter_prob, generator=generator)
    x = random_grayscale(x, pipeline.grayscale_prob, generator)
    x = gaussian_blur(x, pipeline.blur_prob, generator)
    if pipeline.solarize_prob > 0:
        x = solarize(x, pipeline.solarize_prob, generator)
    return x
