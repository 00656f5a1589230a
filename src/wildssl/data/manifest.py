"""JSON-lines manifests: one image per line with captions, labels and boxes."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from wildssl.data.decode import DEFAULT_MAX_PIXELS, EXPECTED_SPEC, FileSource, warn_once
from wildssl.data.sample import DEFAULT_LOAD_SIZE
from wildssl.errors import DataError

log = logging.getLogger("wildssl")


class _Record(NamedTuple):
    path: str
    captions: tuple[str, ...]
    label: int | str | None  # names are replaced by class indices once all lines are read
    labels: tuple[int | str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]  # normalized x0, y0, x1, y1
    pixel_boxes: tuple[tuple[float, float, float, float], ...]  # x, y, w, h in pixels of the file
    box_labels: tuple[int | str | None, ...]  # for boxes, then pixel_boxes
    mask: str | None  # path of the per-pixel class map


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_or_empty(value: Any) -> Any:
    """``null`` and absent mean an empty list; anything else is validated by the caller."""
    return [] if value is None else value


# Integer class ids above this are refused: they become int64 tensors and dense class indices, and an id this large
# is a hash or a database key, which reads as a class name when given as a string.
MAX_CLASS_ID = 2**31 - 1


def _is_class(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)
                                      and 0 <= value <= MAX_CLASS_ID)


class JsonlManifest(FileSource):
    """A JSON-lines manifest: one object per line (blank lines ignored, unknown keys ignored).

    Keys:
        ``path`` or ``file``: the image, absolute or relative to the manifest's folder.
        ``caption`` (str) and/or ``captions`` (list of str).
        ``label``: class name (str) or index (int >= 0); ``labels``: list of them (image multi-label).
        ``boxes``: list of normalized ``[x0, y0, x1, y1]`` in [0, 1], optional parallel ``box_labels``.
        ``objects``: list of ``{"bbox_xywh": [x, y, w, h] in pixels of the image file, "category": name
        or index}`` (the COCO layout of ``shared/data/coco_mini``); boxes are normalized by the decoded
        size and clipped to the image.
        ``mask``: a single-channel image (PNG) of the same size as the image whose pixel values are class
        indices (the CamVid layout of ``shared/data/camvid_scenes``); read by :meth:`mask`, not part of
        the sample dict.
    ``null`` means absent. Class names from all lines form ``classes`` (sorted); a manifest uses either
    names or integer indices, not both. The file is UTF-8 (a byte-order mark is allowed). A malformed
    or non-UTF-8 line raises DataError naming file and line.
    """

    def __init__(self, path: str | os.PathLike, load_size: int = DEFAULT_LOAD_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(load_size, max_pixels)
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"manifest not found: {self.path} ({EXPECTED_SPEC})")
        records: list[_Record] = []
        label_kind: tuple[type, int] | None = None  # (str or int, first line using it)
        # Undecodable bytes are kept as surrogates so the error can name the line instead of a
        # UnicodeDecodeError from somewhere in the file; a byte-order mark (Windows editors) is accepted.
        with open(self.path, encoding="utf-8-sig", errors="surrogateescape") as lines:
            for number, line in enumerate(lines, start=1):
                self._check_utf8(line, number)
                if not line.strip():
                    continue
                record = self._parse_line(line, number)
                for value in (record.label, *record.labels, *record.box_labels):
                    if value is None:
                        continue
                    kind = str if isinstance(value, str) else int
                    if label_kind is None:
                        label_kind = (kind, number)
                    elif label_kind[0] is not kind:
                        kinds = {str: "a class name", int: "an integer"}
                        raise DataError(
                            f"{self.path}:{number}: label {value!r} is {kinds[kind]} but line {label_kind[1]} used "
                            f"{kinds[label_kind[0]]} (use class names throughout or integers throughout)"
                        )
                records.append(record)
        if not records:
            raise DataError(f"manifest {self.path} has no records (expected one JSON object per line)")
        self._check_paths_resolve(records)
        self._warn_labelled_repeats(records)
        if label_kind is not None and label_kind[0] is str:
            names = {v for r in records for v in (r.label, *r.labels, *r.box_labels) if isinstance(v, str)}
            self.classes = sorted(names)
            position = {name: i for i, name in enumerate(self.classes)}
            records = [
                r._replace(
                    label=position.get(r.label),
                    labels=tuple(position[v] for v in r.labels),
                    box_labels=tuple(position.get(v) for v in r.box_labels),
                )
                for r in records
            ]
        self.records = records

    def _warn_labelled_repeats(self, records: list) -> None:
        """A warning when labelled records name an image an earlier labelled record named: a k-NN over the manifest (the
        online one folds over it) then finds the image itself among its neighbours, and reads too high (100% at random
        initialization on 24 noise images listed 4 times). An image named once per caption is not labelled and not
        warned about."""
        first_line: dict[str, int] = {}
        repeats = []
        for number, record in enumerate(records, start=1):
            if record.label is None:
                continue
            key = os.path.normpath(record.path)
            if key in first_line:
                repeats.append((record.path, first_line[key], number))
            else:
                first_line[key] = number
        if repeats:
            path, first, again = repeats[0]
            warn_once(log, ("labelled repeats", str(self.path)), "manifest %s: %d labelled records name an image an "
                      "earlier one named (e.g. %s, records %d and %d): a k-NN over these images finds each repeated "
                      "one among its own neighbours, so its figure reads too high; list each image once", self.path,
                      len(repeats), path, first, again)

    def _check_paths_resolve(self, records: list, first: int = 8) -> None:
        """A DataError when none of the first ``first`` image paths exists: the usual cause is paths written
        relative to another folder than the manifest's (each then failed "to decode", one warning per image)."""
        sample = records[:first]
        if any(os.path.exists(r.path) for r in sample):
            return
        if any("\\" in str(r.path) for r in sample):  # a manifest written on Windows
            raise DataError(f"manifest {self.path}: none of its first {len(sample)} images exists (e.g. "
                            f"{sample[0].path}); its paths separate folders with backslashes (\\), which name no folder here: write them "
                            "with forward slashes (/)")
        raise DataError(f"manifest {self.path}: none of its first {len(sample)} images exists (e.g. {sample[0].path}); "
                        f"relative paths in a manifest are read from the manifest's folder ({self.path.parent}), not "
                        "the current one: write them relative to it, or absolute")

    def _check_utf8(self, line: str, number: int) -> None:
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as error:
            byte = ord(line[error.start]) - 0xDC00  # surrogateescape's code point of the raw byte
            raise DataError(f"{self.path}:{number}: not UTF-8 text (byte 0x{byte:02x} at column {error.start + 1}); "
                            "save the manifest as UTF-8") from None

    def _parse_line(self, line: str, number: int) -> _Record:
        where = f"{self.path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        image = entry.get("path", entry.get("file"))
        if not isinstance(image, str) or not image:
            raise DataError(f'{where}: missing image path (expected a "path" or "file" string)')

        captions: list[str] = []
        caption = entry.get("caption")
        if caption is not None:
            if not isinstance(caption, str):
                raise DataError(f'{where}: "caption" must be a string, got {caption!r}')
            captions.append(caption)
        many = entry.get("captions")
        if many is not None:
            if not isinstance(many, list) or not all(isinstance(c, str) for c in many):
                raise DataError(f'{where}: "captions" must be a list of strings')
            captions.extend(many)

        label = entry.get("label")
        if label is not None and not _is_class(label):
            raise DataError(f'{where}: "label" must be a class name or an integer id in [0, {MAX_CLASS_ID}] (give '
                            f'a larger id as a string), got {label!r}')
        labels = _list_or_empty(entry.get("labels"))
        if not isinstance(labels, list) or not all(_is_class(v) for v in labels):
            raise DataError(f'{where}: "labels" must be a list of class names or integer ids in [0, {MAX_CLASS_ID}]')

        boxes = _list_or_empty(entry.get("boxes"))
        box_labels = entry.get("box_labels")
        if not isinstance(boxes, list) or not all(self._is_normalized_box(b) for b in boxes):
            raise DataError(
                f'{where}: "boxes" must be a list of normalized [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and '
                f'0 <= y0 < y1 <= 1 (pixel boxes go in "objects": [{{"bbox_xywh": [x, y, w, h]}}])'
            )
        if box_labels is None:
            box_labels = [None] * len(boxes)
        if not isinstance(box_labels, list) or len(box_labels) != len(boxes) or not all(
            v is None or _is_class(v) for v in box_labels
        ):
            raise DataError(f'{where}: "box_labels" must be a list of class names or integers, one per box')

        objects = _list_or_empty(entry.get("objects"))
        if not isinstance(objects, list):
            raise DataError(f'{where}: "objects" must be a list of {{"bbox_xywh": [x, y, w, h], "category": ...}}')
        pixel_boxes, object_labels = [], []
        for k, obj in enumerate(objects):
            bbox = obj.get("bbox_xywh") if isinstance(obj, dict) else None
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) and math.isfinite(v)
                                                                      for v in bbox)) or not (
                bbox[2] > 0 and bbox[3] > 0
            ):
                raise DataError(
                    f'{where}: objects[{k}] needs "bbox_xywh": [x, y, w, h] in pixels with w > 0 and h > 0'
                )
            if bbox[0] + bbox[2] <= 0 or bbox[1] + bbox[3] <= 0:
                raise DataError(f'{where}: objects[{k}] "bbox_xywh" {bbox} lies left of or above the image '
                                "(x + w and y + h must be > 0)")
            category = obj.get("category")
            if category is not None and not _is_class(category):
                raise DataError(f'{where}: objects[{k}] "category" must be a class name or an integer id in '
                                f'[0, {MAX_CLASS_ID}]')
            pixel_boxes.append(tuple(float(v) for v in bbox))
            object_labels.append(category)

        mask = entry.get("mask")
        if mask is not None and (not isinstance(mask, str) or not mask):
            raise DataError(f'{where}: "mask" must be the path of a class-index image, got {mask!r}')

        return _Record(
            path=image if os.path.isabs(image) else str(self.path.parent / image),
            captions=tuple(captions),
            label=label,
            labels=tuple(labels),
            boxes=tuple(tuple(float(v) for v in b) for b in boxes),
            pixel_boxes=tuple(pixel_boxes),
            box_labels=tuple(box_labels) + tuple(object_labels),
            mask=None if mask is None else (mask if os.path.isabs(mask) else str(self.path.parent / mask)),
        )

    @staticmethod
    def _is_normalized_box(box: Any) -> bool:
        return (
            isinstance(box, list)
            and len(box) == 4
            and all(_is_number(v) for v in box)
            and 0 <= box[0] < box[2] <= 1
            and 0 <= box[1] < box[3] <= 1
        )

    def __len__(self) -> int:
        return len(self.records)

    def class_labels(self) -> list[int]:
        return [-1 if r.label is None else r.label for r in self.records]

    def _open(self, index: int) -> str:
        return self.records[index].path

    def _name(self, index: int) -> str:
        return self.records[index].path

    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        record = self.records[index]
        boxes = list(record.boxes)
        box_labels = [-1 if v is None else v for v in record.box_labels[: len(boxes)]]
        outside = 0
        for (x, y, w, h), label in zip(record.pixel_boxes, record.box_labels[len(record.boxes):]):
            # annotation tools round outwards: clip rather than reject a box a pixel past the border
            box = (min(max(x / width, 0.0), 1.0), min(max(y / height, 0.0), 1.0),
                   min(max((x + w) / width, 0.0), 1.0), min(max((y + h) / height, 0.0), 1.0))
            if box[2] <= box[0] or box[3] <= box[1]:  # wholly right of or below this image: nothing left
                outside += 1
                continue
            boxes.append(box)
            box_labels.append(-1 if label is None else label)
        if outside:
            warn_once(log, ("boxes outside", str(self.path), record.path),
                      "%s: %d of its object boxes lie outside its %dx%d pixels; left out (manifest %s)",
                      record.path, outside, width, height, self.path)
        return {
            "label": -1 if record.label is None else record.label,
            "labels": list(record.labels),
            "captions": record.captions,
            "boxes": boxes,
            "box_labels": box_labels,
        }

    def mask(self, index: int) -> torch.Tensor | None:
        """The class map of ``mask`` for record ``index``: ``(H, W)`` long, or None without one."""
        path = self.records[index].mask
        if path is None:
            return None
        try:
            with Image.open(path) as image:
                if image.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(f"mask {path} of {self.path} is a {image.mode} image; a mask must have one "
                                    "channel of class indices (8-bit greyscale or palette PNG)")
                pixels = np.array(image, dtype=np.int64)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read mask {path} of {self.path}: {error}") from None
        return torch.from_numpy(pixels)

    def captioned_count(self) -> int:
        return sum(1 for r in self.records if r.captions)

    def describe(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "no class names"
        captioned = self.captioned_count()
        boxes = sum(len(r.boxes) + len(r.pixel_boxes) for r in self.records)
        masks = sum(1 for r in self.records if r.mask)
        return (f"JSONL manifest {self.path}: {len(self)} images, {classes}, {captioned} captioned, {boxes} boxes"
                + (f", {masks} masks" if masks else ""))
