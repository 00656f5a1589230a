"""Decoding image files, and the base of every file-backed source: unreadable items are skipped.

Images in the wild are sometimes truncated, not images at all, or far larger than anything a view needs:
an unreadable item ``i`` (including one above the pixel cap ``max_pixels``) is skipped for ``i + 1,
i + 2, ...`` (modulo the length), recorded in the sample's ``corrupt`` list and logged once per file and
process on the ``wildssl.data`` logger. Only a source with no readable image at all raises
:class:`~wildssl.errors.DataError`.

Memory per decode is bounded by the pixel cap, whatever the file holds: the size is read from the
header before any pixel is decoded, JPEGs are decoded at a reduced scale (DCT scaling, ``draft``) that
still covers the load size, and images are resized in their stored mode before any conversion. A
decode holds at most about 9 bytes per pixel of ``max_pixels`` (palette with transparency 9, RGBA 8,
16-bit 6, float 5, RGB 4, gray 1; ``benchmarks/decode_memory.py``): about 350 MiB at the default. Pillow's own
decompression-bomb limit is lifted for the header read (:func:`open_image`): the cap is the check that counts, so a
JPEG far above Pillow's limit is read at a reduced scale, and ``max_pixels`` above that limit takes effect.

EXIF orientation is not applied: pixels, sizes and boxes refer to the image as stored in the file.

A source whose decoded images all fit in ``DECODED_CACHE_BYTES`` (about 27,000 images at 32 px, 1,300 at 224 px)
keeps each image after its first decode, per process: a small folder is decoded once, not once per epoch. The pixels
are the same (a decode is deterministic). 9,600 reads of 1,700 CIFAR-10 PNGs at 32 px took 1.9-2.2 s uncached and
0.6-0.9 s cached (2026-12-01, 2-core Intel Xeon): about 5% of 300 `dino_quick` steps. Photos from a camera, whose
decode is larger, gain more.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import re
import stat
import threading
from typing import Any, BinaryIO, Hashable

import numpy as np
import torch
from PIL import Image

from wildssl.data.sample import Source, make_sample
from wildssl.errors import DataError

logger = logging.getLogger("wildssl.data")

# Pillow decodes each of these natively. The netpbm family (.ppm, .pgm, .pbm, .pnm) is how several classic photo sets
# ship (GTSRB's traffic signs, for one); .jfif and .jpe are JPEGs under other names.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm")
EXPECTED_SPEC = "expected an image folder, a .jsonl manifest, tar shards or synthetic:scenes"

# Largest image decoded, in pixels after JPEG's reduced decoding (``data.max_pixels``): 40 megapixels,
# 160 MB of RGBA, well below Pillow's decompression-bomb limit (about 89 megapixels).
DEFAULT_MAX_PIXELS = 40_000_000

# Resize in two steps (an integer box reduction, then bilinear over the last factor of at least 3):
# as exact as one bilinear pass to the eye (Pillow's documentation), much faster on large images.
_REDUCING_GAP = 3.0
_STRIP_ROWS = 256  # rows of a float image clipped at a time
DECODED_CACHE_BYTES = 256 * 2**20  # decoded pixels a small source keeps per process (module docstring)


class ImageTooLarge(ValueError):
    """An image whose decoded size is above the source's ``max_pixels``; skipped like an unreadable one."""


# What Pillow raises for undecodable, truncated or absurdly large files, plus unreadable files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_warned: set[Hashable] = set()  # per process: forked workers start from their parent's copy


def warn_once(log: logging.Logger, key: Hashable, message: str, *args: Any) -> None:
    """``log.warning(message, *args)`` the first time this process meets ``key`` (a file, a folder, a message):
    a source read every epoch, or opened again by the online k-NN, says each thing once."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def warn_unreadable(name: str, error: BaseException) -> None:
    """Log an unreadable item once per ``name`` and process on the ``wildssl.data`` logger, on one line (a newline in
    a file name written as ``\\n``; Pillow's ``<_io.BytesIO object at 0x...>`` for a tar member's bytes left out)."""
    reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error))
    warn_once(logger, ("unreadable", name), "skipping unreadable image %s (%s: %s)", name.replace("\n", "\\n"),
              type(error).__name__, reason.replace("\n", " "))


def _integer_range(image: Image.Image) -> tuple[int, int]:
    """The value range of a high-bit-depth integer image's samples: (low, high) of the stored type.

    ``I;16*`` modes hold uint16. Mode ``I`` (int32 in memory) holds 16-bit samples for PNG and PGM
    (Pillow widens them), and for TIFF whatever ``BitsPerSample`` / ``SampleFormat`` say."""
    if image.mode.startswith("I;16"):
        return 0, 65535
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None:
        bits = tags.get(258, (16,))
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        sample_format = tags.get(339, (1,))
        signed = int(sample_format[0] if isinstance(sample_format, tuple) else sample_format) == 2
        return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return 0, 65535


def _high_depth_to_gray(image: Image.Image, load_size: int) -> Image.Image:
    """16/32-bit integer (``I;16*``, ``I``) or float (``F``) gray image -> 8-bit ``L`` (S, S).

    Integers are scaled by their type's range (65535 -> 255), floats by the convention of float image
    files, [0, 1] -> [0, 255], clipped first (NaN -> 0); clipping at 255, as a plain 8-bit conversion
    does, would saturate almost every 16-bit pixel and blacken every float one."""
    if image.mode == "F":
        # clipped in place, a strip of rows at a time, so no full-size float copy is made
        image.load()
        width, height = image.size
        for top in range(0, height, _STRIP_ROWS):
            box = (0, top, width, min(top + _STRIP_ROWS, height))
            strip = np.array(image.crop(box), dtype=np.float32)
            np.nan_to_num(strip, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
            image.paste(Image.fromarray(np.clip(strip, 0.0, 1.0, out=strip)), box)
        low, high = 0.0, 1.0
        small = image.resize((load_size, load_size), Image.BILINEAR, reducing_gap=_REDUCING_GAP)
    else:
        low, high = _integer_range(image)
        # bilinear resizing is linear, so scaling after it equals scaling before it
        small = image.convert("F").resize((load_size, load_size), Image.BILINEAR, reducing_gap=_REDUCING_GAP)
    unit = (np.asarray(small, dtype=np.float64) - low) / (high - low)
    return Image.fromarray(np.rint(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8))  # L


_PILLOW_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is global: lifted for one header read at a time


def open_image(file: str | os.PathLike | BinaryIO) -> Image.Image:
    """``PIL.Image.open`` (the header only) of a regular file, without Pillow's decompression-bomb limit: the pixel
    cap ``max_pixels`` is checked after it, before any pixel is decoded, and after JPEG's reduced-scale decoding, so
    a 20000 x 20000 JPEG is read at 1/8 scale where Pillow refused it at open, and ``data.max_pixels`` above Pillow's
    limit takes effect. A path that is not a regular file (a named pipe, which ``open`` waits on forever; a socket;
    a device) is refused as unreadable."""
    if isinstance(file, (str, os.PathLike)) and not stat.S_ISREG(os.stat(file).st_mode):
        raise ValueError("not a regular file (a named pipe, a socket or a device), so it is not read")
    with _PILLOW_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(file)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def decode_image(file: str | os.PathLike | BinaryIO, load_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, int, int]:
    """Decode an image file to RGB resized to (load_size, load_size) with bilinear filtering.

    Returns the image (3, S, S) uint8 and the original width and height. Transparent pixels are
    composited onto white (as a browser shows them) rather than exposing whatever colour they store;
    16-bit and float images are scaled to 8 bits by their range (see :func:`_high_depth_to_gray`).
    Raises :class:`ImageTooLarge` before decoding any pixel when more than ``max_pixels`` would be
    decoded (for JPEG, after the reduced-scale decoding that still covers ``load_size``).
    """
    with open_image(file) as image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"image has no pixels ({width}x{height})")
        # JPEG only: decode at a power-of-two reduced scale that stays >= load_size on both sides;
        # for large photos this is most of the decoding time and memory.
        image.draft("RGB", (load_size, load_size))
        decoded_width, decoded_height = image.size
        if decoded_width * decoded_height > max_pixels:
            raise ImageTooLarge(f"{width}x{height} image ({decoded_width * decoded_height / 1e6:.1f} megapixels "
                                f"to decode) is above data.max_pixels={max_pixels}")
        rgb = _to_rgb(image, load_size)
    pixels = np.array(rgb, dtype=np.uint8)  # (S, S, 3), a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), width, height


def _to_rgb(image: Image.Image, load_size: int) -> Image.Image:
    """Any Pillow image -> RGB (S, S). Resizing comes before conversions where the stored mode allows
    it, so no full-size converted copy is made of the common modes (L, LA, RGB, RGBA)."""
    size = (load_size, load_size)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _high_depth_to_gray(image, load_size).convert("RGB")
    alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        # palettes resize only by nearest neighbour; other modes (CMYK, YCbCr, ...) convert non-linearly
        image = image.convert("RGBA" if alpha else "RGB")
    small = image.resize(size, Image.BILINEAR, reducing_gap=_REDUCING_GAP)
    if not alpha:
        return small.convert("RGB")
    white = Image.new("RGBA", size, (255, 255, 255, 255))
    return Image.alpha_composite(white, small.convert("RGBA")).convert("RGB")


def check_load_size(load_size: int) -> int:
    if isinstance(load_size, bool) or not isinstance(load_size, int) or load_size < 1:
        raise DataError(f"load_size must be a positive integer number of pixels, got {load_size!r}")
    return load_size


def check_max_pixels(max_pixels: int) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"max_pixels (data.max_pixels, --max-pixels) must be a positive integer, got {max_pixels!r} "
                        f"(default {DEFAULT_MAX_PIXELS})")
    return max_pixels


# ``data.decode: gpu`` (:mod:`wildssl.data.gpu_decode`): which files the device decodes, read here in the
# loader workers as bytes, the rest decoded by the CPU path as always.
DEVICE_FORMATS = ("JPEG", "MPO")
DEVICE_MODES = ("RGB", "L")  # Pillow's mode of a YCbCr or grayscale JPEG; nvJPEG converts both to RGB
_EOI = b"\xff\xd9"  # a JPEG's last marker: a file cut short lacks it and goes to Pillow, which refuses it


def read_jpeg(file: str | os.PathLike | BinaryIO, load_size: int,
              max_pixels: int) -> tuple[torch.Tensor | None, dict | None, int, int]:
    """Read one image file: ``(None, jpeg, width, height)`` for a JPEG the device decodes, where ``jpeg`` is
    ``{"data": the whole file, uint8 (N,), "pixels": width * height}``, and ``(image, None, width, height)``
    otherwise, ``image`` being the CPU path's (3, S, S) uint8 (:func:`~wildssl.data.decode.decode_image`).
    Raises the CPU path's decode errors for a file whose header Pillow cannot read."""
    if isinstance(file, (str, os.PathLike)):
        if not stat.S_ISREG(os.stat(file).st_mode):  # open() would wait on a named pipe forever
            raise ValueError("not a regular file (a named pipe, a socket or a device), so it is not read")
        with open(file, "rb") as handle:
            data = handle.read()
    else:
        data = file.read()
    with open_image(io.BytesIO(data)) as image:  # the header only
        width, height = image.size
        to_device = (image.format in DEVICE_FORMATS and image.mode in DEVICE_MODES
                     and 0 < width * height <= max_pixels and data.endswith(_EOI))
    if to_device:
        return None, {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8), "pixels": width * height}, \
            width, height
    image, width, height = decode_image(io.BytesIO(data), load_size, max_pixels)
    return image, None, width, height


class FileSource(Source):
    """Shared by file-backed sources: decoding and skipping unreadable items.

    ``max_pixels``: images with more pixels to decode are skipped like unreadable ones (see the module
    docstring)."""

    # reads image files through ``_open``, so that ``data.decode: gpu`` can hand JPEGs to the device
    # (:mod:`wildssl.data.gpu_decode`); False where ``_decode`` makes the pixels itself (video frames)
    image_files = True

    def __init__(self, load_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.load_size = check_load_size(load_size)
        self.max_pixels = check_max_pixels(max_pixels)

    @abc.abstractmethod
    def _open(self, index: int) -> str | BinaryIO:
        """Something ``PIL.Image.open`` accepts for item ``index``."""

    @abc.abstractmethod
    def _name(self, index: int) -> str:
        """Where item ``index`` lives, for messages."""

    @abc.abstractmethod
    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        """``make_sample`` keyword arguments of item ``index`` (original image size in pixels)."""

    def _decode(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Item ``index`` as (3, S, S) uint8 with its original width and height; raises one of the
        decode errors (``OSError``, ``ValueError``, ...) for an unreadable item. Image files by default;
        video frames override it."""
        return decode_image(self._open(index), self.load_size, self.max_pixels)

    def _decode_cached(self, index: int) -> tuple[torch.Tensor, int, int]:
        """``_decode(index)``, kept after the first call when the whole source fits in ``DECODED_CACHE_BYTES``;
        a copy of the image is returned, so that nothing done to a sample reaches the cache."""
        cache = self.__dict__.get("_decoded")
        if cache is None:
            fits = len(self) * 3 * self.load_size ** 2 <= DECODED_CACHE_BYTES
            cache = self._decoded = {} if fits else False
        if cache is False:
            return self._decode(index)
        if index not in cache:
            cache[index] = self._decode(index)
        image, width, height = cache[index]
        return image.clone(), width, height

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)

    def item(self, index: int, jpeg_bytes: bool = False) -> dict[str, Any]:
        """``source[index]``; with ``jpeg_bytes`` a JPEG the device can decode is returned undecoded, as its
        file bytes in ``jpeg`` with ``image`` None (``data.decode: gpu``, :mod:`wildssl.data.gpu_decode`)."""
        count = len(self)
        if not 0 <= index < count:
            raise IndexError(f"index {index} out of range for {count} items of {self.describe()}")
        unreadable: list[int] = []
        for skipped in range(count):
            current = (index + skipped) % count
            try:
                if jpeg_bytes and self.image_files:
                    image, jpeg, width, height = read_jpeg(self._open(current), self.load_size, self.max_pixels)
                else:
                    (image, width, height), jpeg = self._decode_cached(current), None
                annotations = self._annotations(current, width, height)
            except DECODE_ERRORS as error:
                self._warn_unreadable(current, error)
                unreadable.append(current)
                continue
            return make_sample(image, width / height, current, corrupt=unreadable, jpeg=jpeg, **annotations)
        raise DataError(f"no readable image in {self.describe()}: all {count} items are missing or could not be "
                        "decoded (the warnings above name each)")

    def _warn_unreadable(self, index: int, error: BaseException) -> None:
        warn_unreadable(self._name(index), error)
