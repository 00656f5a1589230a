"""Decoding image files, and the base of every file-backed source: unreadable items are skipped.

Images in the wild are sometimes truncated or not images at all: an unreadable item ``i`` is skipped
for ``i + 1, i + 2, ...`` (modulo the length), counted in ``num_corrupt`` and logged once per file and
process on the ``wildssl.data`` logger. Only a source with no readable image at all raises
:class:`~wildssl.errors.DataError`.

EXIF orientation is not applied: pixels, sizes and boxes refer to the image as stored in the file.
"""

from __future__ import annotations

import abc
import logging
import os
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from wildssl.data.sample import Source, make_sample
from wildssl.errors import DataError

logger = logging.getLogger("wildssl.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EXPECTED_SPEC = "expected an image folder, a .jsonl manifest, tar shards or synthetic:scenes"

# What Pillow raises for undecodable, truncated or absurdly large files, plus unreadable files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_warned_unreadable: set[str] = set()  # per process: forked workers start from their parent's copy


def decode_image(file: str | os.PathLike | BinaryIO, load_size: int) -> tuple[torch.Tensor, int, int]:
    """Decode an image file to RGB resized to (load_size, load_size) with bilinear filtering.

    Returns the image (3, S, S) uint8 and the original width and height. Transparent pixels are
    composited onto white (as a browser shows them) rather than exposing whatever colour they store.
    """
    with Image.open(file) as image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"image has no pixels ({width}x{height})")
        # JPEG only: decode at a power-of-two reduced scale that stays >= load_size on both sides;
        # for large photos this is most of the decoding time.
        image.draft("RGB", (load_size, load_size))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
        rgb = rgb.resize((load_size, load_size), Image.BILINEAR)
    pixels = np.array(rgb, dtype=np.uint8)  # (S, S, 3), a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), width, height


def check_load_size(load_size: int) -> int:
    if isinstance(load_size, bool) or not isinstance(load_size, int) or load_size < 1:
        raise DataError(f"load_size must be a positive integer number of pixels, got {load_size!r}")
    return load_size


class FileSource(Source):
    """Shared by file-backed sources: decoding and skipping unreadable items."""

    def __init__(self, load_size: int) -> None:
        self.load_size = check_load_size(load_size)

    @abc.abstractmethod
    def _open(self, index: int) -> str | BinaryIO:
        """Something ``PIL.Image.open`` accepts for item ``index``."""

    @abc.abstractmethod
    def _name(self, index: int) -> str:
        """Where item ``index`` lives, for messages."""

    @abc.abstractmethod
    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        """``make_sample`` keyword arguments of item ``index`` (original image size in pixels)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        count = len(self)
        if not 0 <= index < count:
            raise IndexError(f"index {index} out of range for {count} items of {self.describe()}")
        for skipped in range(count):
            current = (index + skipped) % count
            try:
                image, width, height = decode_image(self._open(current), self.load_size)
                annotations = self._annotations(current, width, height)
            except _DECODE_ERRORS as error:
                self._warn_unreadable(current, error)
                continue
            return make_sample(image, width / height, current, num_corrupt=skipped, **annotations)
        raise DataError(f"no readable image in {self.describe()}: all {count} items failed to decode")

    def _warn_unreadable(self, index: int, error: BaseException) -> None:
        name = self._name(index)
        if name not in _warned_unreadable:
            _warned_unreadable.add(name)
            logger.warning("skipping unreadable image %s (%s: %s)", name, type(error).__name__, error)
