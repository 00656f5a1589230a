"""JPEG decoding on the GPU (``data.decode: gpu``): the loader workers read file bytes, the device decodes.

With ``data.decode: gpu`` a file-backed source (image folder, ``.jsonl`` manifest, map-style tar shards) is
read through :class:`JpegBytes`: a worker reads the file and parses its header with Pillow (no pixel is
decoded), and returns a plain baseline/progressive JPEG (Pillow mode ``RGB`` or ``L``, at most
``data.max_pixels`` pixels, ending with its EOI marker) undecoded in the sample's ``jpeg`` entry:
``{"data": the file's bytes, uint8 (N,), "pixels": width x height}``. Anything else (PNG and the other formats, CMYK/YCCK JPEGs, truncated files, images above
the pixel cap, which the CPU path decodes at a reduced scale) is decoded in the worker exactly as with
``data.decode: cpu``. The bytes travel through pinned memory; :class:`DeviceDecoder` then decodes the
batch's JPEGs with ``torchvision.io.decode_jpeg(list, mode=RGB, device=cuda)`` (nvJPEG; a list needs
torchvision >= 0.19), one call per :data:`PIXELS_PER_CALL` decoded pixels (one call per batch of
256-px JPEGs; a few per call of 12-megapixel photos, which bounds the device memory a decode holds),
resizes them to the square ``data.load_size`` on the device (bilinear with antialiasing, as Pillow's), and
the method builds its views there as usual.

Unreadable files are skipped and counted exactly as on the CPU: a file whose header Pillow cannot parse is
skipped in the worker (:class:`~wildssl.data.decode.FileSource`), and a JPEG the device refuses is read
again through the CPU path, ``source[index]``, in the training process: Pillow decodes it, or skips it
for the next item and records it in ``corrupt``, as it would have in the worker. decode_jpeg returns no
partial result when one image of a list fails, so a failed batch is decoded again one image at a time.

The pixels differ from the CPU path's by resampling only: nvJPEG decodes at full size (Pillow decodes a
large JPEG at a reduced DCT scale first, ``draft``) and the resize is PyTorch's. So ``data.decode: cpu``
stays the default: a run's data then does not depend on the machine it runs on.

torchvision is imported only when the key asks for it (it does not import with every torch build).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from wildssl.data.decode import DECODE_ERRORS, FileSource, warn_once
from wildssl.data.sample import collate
from wildssl.errors import ConfigError

logger = logging.getLogger("wildssl.data")

DECODE_CHOICES = ("cpu", "gpu", "auto")
MIN_TORCHVISION = (0, 19)  # decode_jpeg takes a list of images (one batched nvJPEG call) from 0.19
# Pillow's format of a JPEG file: MPO is a camera's JPEG with more pictures appended, of which Pillow and
# nvJPEG both decode the first
# Decoded pixels per decode_jpeg call: 96 MiB of uint8 images, and 384 MiB of float during their resize.
PIXELS_PER_CALL = 32_000_000


def _log_once(message: str, *args: Any) -> None:
    """One log line per message and process."""
    text = message % args
    warn_once(logger, ("gpu decode", text), text)


# ----------------------------------------------------------------------------- choosing the decoder

def _torchvision_problem() -> str | None:
    """Why torchvision cannot decode batches of JPEGs here, or None when it can."""
    try:
        import torchvision  # lazily: it does not import with every torch build
        from torchvision.io import decode_jpeg  # noqa: F401  (the function data.decode=gpu calls)
    except Exception as error:  # noqa: BLE001  (an install for another torch fails in many ways, not only ImportError)
        return f"torchvision does not import ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    version = tuple(int(part) for part in torchvision.__version__.split("+")[0].split(".")[:2] if part.isdigit())
    if version < MIN_TORCHVISION:
        return (f"torchvision {torchvision.__version__} decodes one JPEG per call; batched decoding needs "
                f"torchvision >= {'.'.join(map(str, MIN_TORCHVISION))}")
    return None


def missing(device: torch.device) -> list[str]:
    """What ``data.decode: gpu`` lacks on ``device`` (the run's device), empty when nothing."""
    problems = []
    problem = _torchvision_problem()
    if problem:
        problems.append(problem)
    if device.type != "cuda":
        problems.append(f"no CUDA device (the run's device is {device.type}; torch {torch.__version__}, "
                        f"torch.cuda.is_available() is {torch.cuda.is_available()})")
    return problems


def resolve_decode(value: str, device: torch.device) -> str:
    """``data.decode`` -> ``"cpu"`` or ``"gpu"`` on ``device``. ``gpu`` without torchvision or CUDA raises
    :class:`ConfigError` naming what is missing; ``auto`` takes the GPU when it can and otherwise says once
    in the log why it stays on the CPU."""
    if value not in DECODE_CHOICES:
        raise ConfigError(f"data.decode={value!r} must be one of {', '.join(DECODE_CHOICES)}")
    if value == "cpu":
        return "cpu"
    problems = missing(device)
    if not problems:
        return "gpu"
    if value == "gpu":
        raise ConfigError(f"data.decode=gpu needs torchvision >= {'.'.join(map(str, MIN_TORCHVISION))} and a CUDA "
                          f"device, but: {'; '.join(problems)}; set data.decode=cpu (or auto)")
    _log_once("data.decode=auto: JPEGs are decoded on the CPU (%s)", "; ".join(problems))
    return "cpu"


def supports(source: object) -> bool:
    """Whether ``source`` reads image files the device can decode (not video frames, synthetic scenes or
    streamed shards, which stay on the CPU path)."""
    return isinstance(source, FileSource) and source.image_files


# ----------------------------------------------------------------------------- in the loader workers

class JpegBytes(Dataset):
    """``source`` as the loader workers read it with ``data.decode: gpu``: item ``i`` is ``source[i]`` with
    the image left as JPEG bytes in ``jpeg`` (and ``image`` None) where the device can decode it."""

    def __init__(self, source: FileSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source.item(index, jpeg_bytes=True)


# ----------------------------------------------------------------------------- on the device

def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG files (uint8 ``(N_i,)`` on the CPU) -> RGB images uint8 ``(3, H_i, W_i)`` on ``device``, in one
    batched nvJPEG call. Raises when any image fails (decode_jpeg returns no partial result)."""
    # imported lazily: see the module docstring
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> uint8 ``(B, 3, size, size)``: bilinear with antialiasing (a triangle filter
    as wide as the scale, as Pillow's BILINEAR), anisotropic like the CPU path, rounded to the nearest
    integer. Images already of the size are returned as they are."""
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def _calls(rows: list[tuple[int, int]]) -> list[list[int]]:
    """``(row, pixels)`` of the batch's JPEGs -> the rows of each decode call, in order, each call holding at
    most :data:`PIXELS_PER_CALL` pixels (a larger image alone)."""
    calls: list[list[int]] = []
    total = PIXELS_PER_CALL
    for row, pixels in rows:
        if total + pixels > PIXELS_PER_CALL:
            calls.append([])
            total = 0
        calls[-1].append(row)
        total += pixels
    return calls


class DeviceDecoder:
    """Finishes on ``device`` the batches a :class:`JpegBytes` loader collated: ``batch["image"]`` becomes
    uint8 ``(B, 3, S, S)`` on the device, the JPEGs decoded and resized there.

    The JPEGs are decoded by :func:`decode_jpegs` (looked up at each call: the tests put a Pillow decoder
    there). A file it refuses is read through ``source[index]`` (the CPU path), so that an unreadable file
    is skipped and recorded in the batch's ``corrupt`` as in a worker. ``decoded`` and ``refused`` count the
    images so far."""

    def __init__(self, source: FileSource, device: torch.device) -> None:
        self.source, self.device, self.load_size = source, torch.device(device), source.load_size
        self.decoded = self.refused = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        jpegs = batch.get("jpeg")
        if jpegs is None:  # no JPEG for the device in this batch: collated as usual
            return batch
        batch = {key: value for key, value in batch.items() if key != "jpeg"}
        images: list[torch.Tensor | None] = list(batch["image"])
        for rows in _calls([(row, jpeg["pixels"]) for row, jpeg in enumerate(jpegs) if jpeg is not None]):
            by_shape: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
            for row, image in zip(rows, self._decode_all([jpegs[row]["data"] for row in rows])):
                if image is None:
                    self._read_on_cpu(batch, images, row)
                else:
                    by_shape[tuple(image.shape[-2:])].append((row, image))
            for group in by_shape.values():  # one resize per image size (a folder of equal sizes: one call)
                resized = resize_square(torch.stack([image for _, image in group]), self.load_size)
                for (row, _), image in zip(group, resized):
                    images[row] = image
        batch["image"] = torch.stack([image.to(self.device, non_blocking=True) for image in images])
        return batch

    def _decode_all(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The decoded images (3, H, W) on the device, None where the decoder refused the file."""
        if not data:
            return []
        decode = decode_jpegs
        try:
            images = list(decode(data, self.device))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, *DECODE_ERRORS):  # one bad file fails the whole list: decode one at a time
            images = []
            for one in data:
                try:
                    images.extend(decode([one], self.device))
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, *DECODE_ERRORS):
                    images.append(None)
        checked = []
        for image in images:
            if image is not None and image.dim() == 3 and image.shape[0] == 1:  # gray decoded as is
                image = image.expand(3, -1, -1)
            ok = image is not None and image.dim() == 3 and image.shape[0] == 3 and image.dtype == torch.uint8
            checked.append(image if ok else None)
        self.decoded += sum(image is not None for image in checked)
        return checked

    def _read_on_cpu(self, batch: dict[str, Any], images: list, row: int) -> None:
        """Replace ``row`` of the batch by ``source[index]``: the CPU path's decode of the same file, or its
        skip to the next readable item, whose index joins the batch's ``corrupt``."""
        index = int(batch["index"][row])
        self.refused += 1
        _log_once("the device decoder refused %s; reading it on the CPU", self.source._name(index))
        sample = collate([self.source[index]])
        for key, value in sample.items():
            if key == "image":
                images[row] = value[0]
            elif key not in ("corrupt", "num_corrupt"):
                batch[key][row] = value[0]  # a tensor's row or a list's entry
        batch["corrupt"] = sorted(set(batch["corrupt"]) | set(sample["corrupt"]))
        batch["num_corrupt"] = len(batch["corrupt"])
