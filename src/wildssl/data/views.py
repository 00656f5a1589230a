"""Batched RandomResizedCrop views on the device, each remembering its box and flip; multi-crop.

A batch of uint8 images ``(B, 3, S, S)`` (sources resize every image to a square, keeping normalized
coordinates and reporting the original W/H as ``aspect``) becomes one :class:`ViewBatch` per
:class:`CropSpec`. Crop boxes are sampled as torchvision's ``RandomResizedCrop`` does, but in
normalized coordinates of the *original* image and vectorized over the batch; cropping, resizing and
flipping are one ``grid_sample`` call; the photometric pipelines are in
:mod:`wildssl.data.photometric`. Every random draw comes from the ``torch.Generator`` passed in, made
on that generator's device, so a CPU generator gives bit-identical views on CPU for the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from wildssl.data.photometric import DINO_PIPELINES, PIPELINES, apply_pipeline
from wildssl.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's RandomResizedCrop makes 10 attempts before falling back to a centre crop.
_CANDIDATES = 10


def _rand(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform [0, 1) draws on the generator's device (for reproducibility), moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not low < value[0] <= value[1] <= high:
        raise ConfigError(f"crop {name} {tuple(value)} invalid; need ({low} <) min <= max (<= {high})")


def sample_crop_boxes(
    batch_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    aspect: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``(B, 4)`` (normalized x0, y0, x1, y1 of the original image), float32.

    Per image: area fraction ``f ~ U(scale)``, pixel aspect ratio ``r = w_px / h_px`` with
    ``log r ~ U(log ratio)``. With the original image's ``aspect = W / H`` (``(B,)``, default 1), the
    normalized size solves ``wn * hn = f`` and ``(wn W) / (hn H) = r``:
    ``wn = sqrt(f r / aspect)``, ``hn = sqrt(f aspect / r)``.
    Ten candidates are drawn per image at once and the first that fits (``wn, hn <= 1``) is kept, its
    position uniform among the positions inside the image. Images where none fits get torchvision's
    fallback: the largest centred box whose pixel ratio is ``aspect`` clamped into ``ratio``.
    Boxes are continuous (not rounded to pixels); views are resampled with ``grid_sample`` anyway.
    """
    _check_range("scale", scale, 0.0, 1.0)
    _check_range("ratio", ratio, 0.0, math.inf)
    if device is None:
        device = aspect.device if aspect is not None else torch.device("cpu")
    device = torch.device(device)
    if aspect is None:
        aspect = torch.ones(batch_size, device=device)
    elif aspect.shape != (batch_size,):
        raise DataError(f"crop sampling: aspect has shape {tuple(aspect.shape)}, expected ({batch_size},)")
    aspect = aspect.to(device=device, dtype=torch.float32).unsqueeze(1)

    draws = _rand((batch_size, 2 * _CANDIDATES + 2), generator, device)
    area = scale[0] + (scale[1] - scale[0]) * draws[:, :_CANDIDATES]
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    pixel_ratio = torch.exp(log_low + (log_high - log_low) * draws[:, _CANDIDATES : 2 * _CANDIDATES])
    position = draws[:, 2 * _CANDIDATES :]

    # Normalized width / height = pixel ratio / image aspect.
    normalized_ratio = pixel_ratio / aspect
    widths = torch.sqrt(area * normalized_ratio)
    heights = torch.sqrt(area / normalized_ratio)
    fits = (widths <= 1.0) & (heights <= 1.0)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    width = widths.gather(1, first).squeeze(1)
    height = heights.gather(1, first).squeeze(1)
    x0 = position[:, 0] * (1.0 - width)
    y0 = position[:, 1] * (1.0 - height)

    aspect = aspect.squeeze(1)
    fallback_width = (ratio[1] / aspect).clamp(max=1.0)
    fallback_height = (aspect / ratio[0]).clamp(max=1.0)
    fallback = ~fits.any(dim=1)
    width = torch.where(fallback, fallback_width, width)
    height = torch.where(fallback, fallback_height, height)
    x0 = torch.where(fallback, (1.0 - fallback_width) / 2, x0)
    y0 = torch.where(fallback, (1.0 - fallback_height) / 2, y0)
    # Rounding can push x0 + width a hair past 1.
    return torch.stack((x0, y0, x0 + width, y0 + height), dim=1).clamp(0.0, 1.0)


def _output_size(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ConfigError(f"crop size {size} invalid; need positive height and width")
    return height, width


def crop_and_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int | tuple[int, int],
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop ``boxes`` out of ``images`` and resample them to ``size``, optionally mirrored.

    ``images`` ``(B, C, H, W)`` float; ``boxes`` ``(B, 4)`` normalized x0, y0, x1, y1 -> ``(B, C, h, w)``,
    or ``(B, K, 4)`` (K crops per image) -> ``(B, K, C, h, w)``; ``flip`` ``(B,)`` / ``(B, K)`` bool.
    Output pixel ``(i, j)`` samples the image at the box point ``(x0 + (j + 0.5) / w * (x1 - x0),
    y0 + (i + 0.5) / h * (y1 - y0))`` (pixel centres map onto pixel centres), bilinearly with
    ``align_corners=False``; a flip takes column ``w - 1 - j`` instead. The sampling grid is the affine
    map of the box written out directly, so the K crops of an image share one ``grid_sample`` call
    (laid side by side) without copying the image. Edges replicate (``padding_mode="border"``), so
    sample points within half a pixel of the image edge are not blended with black. No antialiasing:
    boxes much larger than the output alias, as plain bilinear resizing does.
    """
    height, width = _output_size(size)
    single = boxes.dim() == 2
    if single:
        boxes = boxes.unsqueeze(1)
        flip = flip.unsqueeze(1) if flip is not None else None
    batch, crops = boxes.shape[:2]
    if images.dim() != 4 or boxes.shape != (images.shape[0], crops, 4):
        raise DataError(
            f"crop_and_resize: images {tuple(images.shape)} and boxes {tuple(boxes.shape)} do not match; "
            "expected images (B, C, H, W) with boxes (B, 4) or (B, K, 4)"
        )
    boxes = boxes.to(images.dtype)
    x0, y0, x1, y1 = boxes.unbind(dim=-1)  # (B, K) each
    if flip is not None:
        x0, x1 = torch.where(flip, x1, x0), torch.where(flip, x0, x1)
    cols = (torch.arange(width, device=images.device, dtype=images.dtype) + 0.5) / width
    rows = (torch.arange(height, device=images.device, dtype=images.dtype) + 0.5) / height
    # grid_sample coordinates: -1 and 1 are the outer edges of the image (align_corners=False).
    grid_x = 2.0 * (x0.unsqueeze(-1) + (x1 - x0).unsqueeze(-1) * cols) - 1.0  # (B, K, w)
    grid_y = 2.0 * (y0.unsqueeze(-1) + (y1 - y0).unsqueeze(-1) * rows) - 1.0  # (B, K, h)
    grid = torch.stack(
        (
            grid_x.unsqueeze(1).expand(batch, height, crops, width),
            grid_y.transpose(1, 2).unsqueeze(-1).expand(batch, height, crops, width),
        ),
        dim=-1,
    ).reshape(batch, height, crops * width, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.view(batch, images.shape[1], height, crops, width).permute(0, 3, 1, 2, 4)
    return out[:, 0] if single else out


@dataclass
class ViewBatch:
    """One view of every image in a batch.

    ``images`` ``(B, 3, h, w)`` float, normalized; ``boxes`` ``(B, 4)`` the crop in normalized coordinates
    of the original image (independent of the flip); ``flipped`` ``(B,)`` bool, True where the view is
    mirrored; ``source_index`` ``(B,)`` long, the batch row each view was cut from.
    """

    images: torch.Tensor
    boxes: torch.Tensor
    flipped: torch.Tensor
    source_index: torch.Tensor


@dataclass(frozen=True)
class CropSpec:
    """How to make one view: output ``size`` (pixels), RandomResizedCrop ``scale`` (area fraction) and
    ``ratio`` (pixel aspect), horizontal flip probability, and a photometric pipeline name from
    :data:`wildssl.data.photometric.PIPELINES` (None: no photometric augmentation)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    photometric: str | None = None

    def __post_init__(self) -> None:
        _output_size(self.size)
        _check_range("scale", self.scale, 0.0, 1.0)
        _check_range("ratio", self.ratio, 0.0, math.inf)
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"crop flip_prob {self.flip_prob} is outside [0, 1]")
        if self.photometric is not None and self.photometric not in PIPELINES:
            raise ConfigError(
                f"crop photometric {self.photometric!r} is unknown; choose one of {sorted(PIPELINES)} or None"
            )


def simclr_specs(size: int = 224) -> list[CropSpec]:
    """SimCLR's two views: RandomResizedCrop(size, scale=(0.08, 1)), flip 0.5, the ``simclr`` pipeline."""
    return [CropSpec(size=size, scale=(0.08, 1.0), photometric="simclr") for _ in range(2)]


def dino_specs(
    global_size: int = 224,
    local_size: int = 96,
    n_local: int = 8,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    photometric: str | None = None,
) -> list[CropSpec]:
    """DINO multi-crop: two global views (pipelines ``dino_global1``, ``dino_global2``) then ``n_local``
    local views (``dino_local``), all flipped with probability 0.5. ``photometric`` (a name of
    :data:`wildssl.data.photometric.PIPELINES`) replaces the three with one pipeline on every crop, e.g.
    ``simclr_cifar`` for 32-px photos, where the paper's blur (p = 1 on the first global crop) smears the
    little detail a crop holds.

    Defaults are the ``main_dino.py`` argparse defaults (global (0.4, 1), 8 local crops of 96 px at
    (0.05, 0.4)). The released ViT-S/16 and ViT-B/16 runs instead used global (0.25, 1) and 10 local
    crops at (0.05, 0.25); recipes that reproduce them should pass those values.
    """
    global1, global2, local = (photometric,) * 3 if photometric else DINO_PIPELINES
    return [
        CropSpec(size=global_size, scale=global_scale, photometric=global1),
        CropSpec(size=global_size, scale=global_scale, photometric=global2),
    ] + [CropSpec(size=local_size, scale=local_scale, photometric=local) for _ in range(n_local)]


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"make_views: images are {images.dtype} {tuple(images.shape)}; expected uint8 (B, 3, H, W)"
        )
    return images.float().div_(255.0)


def _render(
    pixels: torch.Tensor,
    boxes: torch.Tensor,
    flipped: torch.Tensor | None,
    size: int | tuple[int, int],
    photometric: str | None,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Float pixels ``(B, 3, H, W)`` in [0, 1] and ``K`` boxes per image ``(B, K, 4)`` -> normalized
    views ``(K * B, 3, h, w)``, crop-major (row ``k * B + b`` is crop ``k`` of image ``b``)."""
    crops = boxes.shape[1]
    out = crop_and_resize(pixels, boxes, size, flipped)
    out = out.transpose(0, 1).reshape(crops * pixels.shape[0], 3, *out.shape[-2:])
    if photometric is not None:
        out = apply_pipeline(photometric, out, generator)
    return normalize(out, mean, std)


def normalize(pixels: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Float pixels ``(B, 3, H, W)`` in [0, 1] -> ``(pixels - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def preprocess_images(images: torch.Tensor, image_size: int, normalize_images: bool = True) -> torch.Tensor:
    """Turn a batch into the encoder's input without augmentation (evaluation, annotation features):
    ``(B, 3, S, S)`` -> float32 ``(B, 3, image_size, image_size)``.

    With ``normalize_images`` the batch must be uint8 in [0, 255]; it is scaled to [0, 1], resized
    (bilinear, antialiased) and normalized with ImageNet mean/std. Without it the batch must already be
    a normalized float tensor and is only resized.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"image batch has shape {tuple(images.shape)}; expected (B, 3, H, W)")
    if normalize_images:
        if images.dtype != torch.uint8:
            raise DataError(
                f"image batch is {images.dtype} but normalize_images=True expects uint8 pixels from a wildssl "
                "source; pass normalize_images=False for images that are already normalized floats"
            )
        x = images.float() / 255.0
    else:
        if not images.is_floating_point():
            raise DataError(
                f"image batch is {images.dtype} but normalize_images=False expects normalized float images; "
                "use normalize_images=True for uint8 pixels"
            )
        x = images.float()
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x) if normalize_images else x


def crops_at_boxes(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int | tuple[int, int],
    generator: torch.Generator,
    photometric: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Views of given boxes, as :func:`make_views` renders its own: uint8 ``images`` ``(B, 3, H, W)`` and
    ``boxes`` ``(B, K, 4)`` -> normalized ``(K * B, 3, h, w)``, crop-major; no flip; the photometric
    pipeline (if any) draws from ``generator``. For boxes chosen elsewhere (annotation bootstrapping's
    IoU-conditioned targets)."""
    if boxes.dim() != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[-1] != 4:
        raise DataError(f"crops_at_boxes: boxes {tuple(boxes.shape)} do not match images {tuple(images.shape)}; "
                        "expected (B, K, 4)")
    return _render(_to_float(images), boxes, None, size, photometric, generator, mean, std)


def make_views(
    images: torch.Tensor,
    specs: Sequence[CropSpec],
    generator: torch.Generator,
    aspect: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> list[ViewBatch]:
    """One :class:`ViewBatch` per spec, in order, from uint8 ``images`` ``(B, 3, H, W)``.

    The images are converted to float [0, 1] once; per spec, boxes and flips are sampled, the crops
    resampled, the photometric pipeline applied per sample and the result normalized with
    ``mean``/``std``. Runs of consecutive identical specs (e.g. DINO's local crops) are processed as
    one batch of ``K * B`` views. ``aspect`` ``(B,)``: W/H of the original images (default: W/H of
    ``images``).
    """
    pixels = _to_float(images)
    if not specs:
        raise ConfigError("make_views: no crop specs given; pass at least one CropSpec")
    batch, _, height, width = images.shape
    device = images.device
    if aspect is None:
        aspect = torch.full((batch,), width / height, device=device)
    elif aspect.shape != (batch,):
        raise DataError(f"make_views: aspect has shape {tuple(aspect.shape)}, expected ({batch},)")
    elif aspect.device.type == "cpu":  # a source's aspect; checking one on an accelerator would wait every step
        invalid = ~((aspect > 0) & torch.isfinite(aspect))
        if bool(invalid.any()):
            raise DataError(f"make_views: aspect (W/H of each original image) must be finite and > 0, got "
                            f"{aspect[invalid][0].item()} (NaN gave NaN boxes, a negative one an inverted box)")
    source_index = torch.arange(batch, device=device)

    views: list[ViewBatch] = []
    start = 0
    while start < len(specs):
        spec = specs[start]
        end = start + 1
        while end < len(specs) and specs[end] == spec:
            end += 1
        crops = end - start
        # Rows are ordered (crop, image): row k * B + b is crop k of image b.
        boxes = sample_crop_boxes(
            crops * batch, spec.scale, spec.ratio, aspect.repeat(crops), generator, device
        )
        flipped = _rand((crops * batch,), generator, device) < spec.flip_prob
        out = _render(
            pixels,
            boxes.view(crops, batch, 4).transpose(0, 1),
            flipped.view(crops, batch).transpose(0, 1),
            spec.size,
            spec.photometric,
            generator,
            mean,
            std,
        )
        for k in range(crops):
            rows = slice(k * batch, (k + 1) * batch)
            views.append(ViewBatch(out[rows], boxes[rows], flipped[rows], source_index))
        start = end
    return views
