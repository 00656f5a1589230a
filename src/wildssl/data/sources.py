"""Map-style data sources: image folders, JSONL manifests, WebDataset tar shards, synthetic scenes.

``source[i]`` is a deterministic function of ``i`` (so a run resumes exactly from a step count) and
returns one sample dict:

=============  ====================================================================================
image          uint8 (3, S, S): decoded RGB resized to the square ``load_size`` S (Pillow bilinear,
               anisotropic; normalized box coordinates are unchanged by it)
aspect         float, width / height of the original image
label          int, class index (-1 = none)
labels         list[int], image-level multi-label (maybe empty)
caption        str: one of ``captions``, ``captions[index % len(captions)]``, so each image keeps the
               same caption in every epoch and different images use different caption positions;
               "" when there is none
captions       list[str], all captions
boxes          float32 (M, 4) normalized x0, y0, x1, y1 of the original image (M may be 0)
box_labels     long (M,), class index per box (-1 = none)
index          int, the index actually returned (see below)
num_corrupt    int, how many unreadable images were skipped to produce this sample
=============  ====================================================================================

Images in the wild are sometimes truncated or not images at all: an unreadable item ``i`` is skipped
for ``i + 1, i + 2, ...`` (modulo the length), counted in ``num_corrupt`` and logged once per file and
process on the ``wildssl.data`` logger. Only a source with no readable image at all raises
:class:`~wildssl.errors.DataError`.

EXIF orientation is not applied: pixels, sizes and boxes refer to the image as stored in the file.
"""

from __future__ import annotations

import abc
import glob
import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from wildssl.errors import DataError

logger = logging.getLogger("wildssl.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_LOAD_SIZE = 224
EXPECTED_SPEC = "expected an image folder, a .jsonl manifest, tar shards or synthetic:scenes"

# What Pillow raises for undecodable, truncated or absurdly large files, plus unreadable files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_warned_unreadable: set[str] = set()  # per process: forked workers start from their parent's copy


class Source(Dataset, abc.ABC):
    """A map-style data source; see the module docstring for the sample dict.

    Attributes:
        classes: class names indexed by ``label`` / ``labels`` / ``box_labels``, or ``None`` when the
            labels are bare integers or there are none.
        load_size: side S of the square images returned.
    """

    classes: list[str] | None = None
    load_size: int

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs: kind, location, size, classes."""


def make_sample(
    image: torch.Tensor,
    aspect: float,
    index: int,
    *,
    label: int = -1,
    labels: Sequence[int] = (),
    captions: Sequence[str] = (),
    boxes: Sequence[Sequence[float]] = (),
    box_labels: Sequence[int] | None = None,
    num_corrupt: int = 0,
) -> dict[str, Any]:
    """Assemble a sample dict (module docstring) from an image (3, S, S) uint8 and its annotations."""
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if box_labels is None:
        box_labels = [-1] * len(box_tensor)
    captions = list(captions)
    return {
        "image": image,
        "aspect": float(aspect),
        "label": int(label),
        "labels": [int(v) for v in labels],
        "caption": captions[index % len(captions)] if captions else "",
        "captions": captions,
        "boxes": box_tensor,
        "box_labels": torch.tensor(list(box_labels), dtype=torch.long),
        "index": int(index),
        "num_corrupt": int(num_corrupt),
    }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts: image (B, 3, S, S) uint8, aspect (B,) float32, label (B,) long, index (B,) long,
    num_corrupt int (sum), caption list[str]; labels, captions, boxes (M_b, 4) and box_labels (M_b,)
    stay per-sample lists because their lengths differ."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "aspect": torch.tensor([s["aspect"] for s in samples], dtype=torch.float32),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "num_corrupt": sum(s["num_corrupt"] for s in samples),
        "caption": [s["caption"] for s in samples],
        "captions": [s["captions"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "boxes": [s["boxes"] for s in samples],
        "box_labels": [s["box_labels"] for s in samples],
    }


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


def _check_load_size(load_size: int) -> int:
    if isinstance(load_size, bool) or not isinstance(load_size, int) or load_size < 1:
        raise DataError(f"load_size must be a positive integer number of pixels, got {load_size!r}")
    return load_size


class _FileSource(Source):
    """Shared by file-backed sources: decoding and skipping unreadable items."""

    def __init__(self, load_size: int) -> None:
        self.load_size = _check_load_size(load_size)

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


# ---------------------------------------------------------------------------------------------------
# Image folder


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_images(root: Path) -> list[str]:
    """Relative POSIX paths of all image files under ``root``, sorted. Hidden files and folders
    (``.git``, macOS ``._x.jpg`` resource forks) are skipped; symlinked folders are followed once."""
    found: list[str] = []
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop or a second link to the same folder
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        relative = Path(folder).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        found.extend(prefix + name for name in files if _is_image_name(name))
    return sorted(found)


class ImageFolder(_FileSource):
    """Every image file under ``root`` (recursive; jpg, jpeg, png, webp, bmp, gif, tif, tiff in any case),
    in sorted path order.

    When every image lies inside a first-level subfolder and there are at least two such subfolders,
    their sorted names are the classes (the usual ``root/<class>/...`` layout); otherwise labels are -1.
    A single subfolder is not taken as a class: ``root/images/*.jpg`` is an unlabelled folder.
    """

    def __init__(self, root: str | os.PathLike, load_size: int = DEFAULT_LOAD_SIZE) -> None:
        super().__init__(load_size)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root} ({EXPECTED_SPEC})")
        self.paths = _scan_images(self.root)
        if not self.paths:
            raise DataError(
                f"no images in folder {self.root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)} files)"
            )
        first_parts = [p.split("/", 1)[0] if "/" in p else None for p in self.paths]
        class_names = sorted({part for part in first_parts if part is not None})
        if None not in first_parts and len(class_names) >= 2:
            self.classes = class_names
            position = {name: i for i, name in enumerate(class_names)}
            self.labels = [position[part] for part in first_parts]
        else:
            self.classes = None
            self.labels = [-1] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def _name(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        label = self.labels[index]
        return {"label": label, "labels": [label] if label >= 0 else []}

    def describe(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "no labels"
        return f"image folder {self.root}: {len(self)} images, {classes}"


# ---------------------------------------------------------------------------------------------------
# JSONL manifest


class _Record(NamedTuple):
    path: str
    captions: tuple[str, ...]
    label: int | str | None  # names are replaced by class indices once all lines are read
    labels: tuple[int | str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]  # normalized x0, y0, x1, y1
    pixel_boxes: tuple[tuple[float, float, float, float], ...]  # x, y, w, h in pixels of the file
    box_labels: tuple[int | str | None, ...]  # for boxes, then pixel_boxes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_or_empty(value: Any) -> Any:
    """``null`` and absent mean an empty list; anything else is validated by the caller."""
    return [] if value is None else value


def _is_class(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


class JsonlManifest(_FileSource):
    """A JSON-lines manifest: one object per line (blank lines ignored, unknown keys ignored).

    Keys:
        ``path`` or ``file``: the image, absolute or relative to the manifest's folder.
        ``caption`` (str) and/or ``captions`` (list of str).
        ``label``: class name (str) or index (int >= 0); ``labels``: list of them (image multi-label).
        ``boxes``: list of normalized ``[x0, y0, x1, y1]`` in [0, 1], optional parallel ``box_labels``.
        ``objects``: list of ``{"bbox_xywh": [x, y, w, h] in pixels of the image file, "category": name
        or index}`` (the COCO layout of ``shared/data/coco_mini``); boxes are normalized by the decoded
        size and clipped to the image.
    ``null`` means absent. Class names from all lines form ``classes`` (sorted); a manifest uses either
    names or integer indices, not both. A malformed line raises DataError naming file and line.
    """

    def __init__(self, path: str | os.PathLike, load_size: int = DEFAULT_LOAD_SIZE) -> None:
        super().__init__(load_size)
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"manifest not found: {self.path} ({EXPECTED_SPEC})")
        records: list[_Record] = []
        label_kind: tuple[type, int] | None = None  # (str or int, first line using it)
        with open(self.path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
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
            raise DataError(f'{where}: "label" must be a class name or an integer >= 0, got {label!r}')
        labels = _list_or_empty(entry.get("labels"))
        if not isinstance(labels, list) or not all(_is_class(v) for v in labels):
            raise DataError(f'{where}: "labels" must be a list of class names or integers >= 0')

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
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)) or not (
                bbox[2] > 0 and bbox[3] > 0
            ):
                raise DataError(
                    f'{where}: objects[{k}] needs "bbox_xywh": [x, y, w, h] in pixels with w > 0 and h > 0'
                )
            category = obj.get("category")
            if category is not None and not _is_class(category):
                raise DataError(f'{where}: objects[{k}] "category" must be a class name or an integer >= 0')
            pixel_boxes.append(tuple(float(v) for v in bbox))
            object_labels.append(category)

        return _Record(
            path=image if os.path.isabs(image) else str(self.path.parent / image),
            captions=tuple(captions),
            label=label,
            labels=tuple(labels),
            boxes=tuple(tuple(float(v) for v in b) for b in boxes),
            pixel_boxes=tuple(pixel_boxes),
            box_labels=tuple(box_labels) + tuple(object_labels),
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

    def _open(self, index: int) -> str:
        return self.records[index].path

    def _name(self, index: int) -> str:
        return self.records[index].path

    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        record = self.records[index]
        boxes = list(record.boxes)
        for x, y, w, h in record.pixel_boxes:
            # annotation tools round outwards: clip rather than reject a box a pixel past the border
            boxes.append(
                (
                    min(max(x / width, 0.0), 1.0),
                    min(max(y / height, 0.0), 1.0),
                    min(max((x + w) / width, 0.0), 1.0),
                    min(max((y + h) / height, 0.0), 1.0),
                )
            )
        return {
            "label": -1 if record.label is None else record.label,
            "labels": list(record.labels),
            "captions": record.captions,
            "boxes": boxes,
            "box_labels": [-1 if v is None else v for v in record.box_labels],
        }

    def describe(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "no class names"
        captioned = sum(1 for r in self.records if r.captions)
        boxes = sum(len(r.boxes) + len(r.pixel_boxes) for r in self.records)
        return f"JSONL manifest {self.path}: {len(self)} images, {classes}, {captioned} captioned, {boxes} boxes"


# ---------------------------------------------------------------------------------------------------
# WebDataset tar shards

_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_OPEN_SHARDS = 32  # file handles kept open per process (random access jumps between shards)


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style brace groups, in order: ``"s{00..02}.tar"`` -> ``s00.tar, s01.tar, s02.tar``;
    ``"{a,b}/x"`` -> ``a/x, b/x``; several groups give their product. A range is zero-padded when a bound
    is written with a leading zero, to the wider bound's width."""
    match = _BRACE_GROUP.search(pattern)
    if match is None or "{" in pattern[: match.start()] or "}" in pattern[: match.start()]:
        if "{" in pattern or "}" in pattern:
            raise DataError(f"unbalanced or nested braces in {pattern!r} (expected e.g. shards/{{00000..00009}}.tar)")
        return [pattern]
    body = match.group(1)
    numeric = _NUMERIC_RANGE.fullmatch(body)
    if numeric:
        low, high = numeric.groups()
        if int(high) < int(low):
            raise DataError(f"descending range {{{body}}} in {pattern!r} (write the smaller bound first)")
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (low, high))
        width = max(len(low), len(high)) if padded else 0
        choices = [str(v).zfill(width) for v in range(int(low), int(high) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise DataError(f"brace group {{{body}}} in {pattern!r} is neither a range a..b nor a list a,b")
    head, tails = pattern[: match.start()], expand_braces(pattern[match.end() :])
    return [head + choice + tail for choice in choices for tail in tails]


def _shard_paths(pattern: str | os.PathLike) -> list[Path]:
    """The shard files a pattern names: a tar file, a folder (its top-level ``*.tar``, sorted), a glob
    (sorted) or a brace pattern (in expansion order; each expanded name may itself be a glob)."""
    text = os.fspath(pattern)
    path = Path(text)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".tar"))
        if not shards:
            raise DataError(f"no .tar shards in folder {path} ({EXPECTED_SPEC})")
        return shards
    if path.is_file():
        return [path]
    shards: list[Path] = []
    for name in expand_braces(text):
        if _GLOB_CHARS.search(name):
            matches = sorted(glob.glob(name))
            if not matches:
                raise DataError(f"no files match {name!r} (from data pattern {text!r})")
            shards.extend(Path(m) for m in matches)
        elif Path(name).is_file():
            shards.append(Path(name))
        elif name == text:
            raise DataError(f"data path not found: {text} ({EXPECTED_SPEC})")
        else:
            raise DataError(f"tar shard not found: {name} (from data pattern {text!r})")
    return shards


class _TarSample(NamedTuple):
    shard: int
    key: str
    image_offset: int
    image_size: int
    text_offset: int  # -1: no caption
    text_size: int
    label: int


def _split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: the key is the path up to the first dot of the file name, the extension
    is the rest (lower-cased). Hidden files (macOS ``._x.jpg``) and names without a dot are not samples."""
    if name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


_TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


class TarShards(_FileSource):
    """WebDataset tar shards as img2dataset writes them: ``key.jpg`` (or png, webp, ...), ``key.txt``
    (caption), ``key.json`` (metadata, not read), optional ``key.cls`` (integer label).

    ``pattern``: a tar file, a folder of ``*.tar``, a glob or a brace pattern ``data/{00000..00009}.tar``.
    Every shard is indexed once at construction (member offsets from ``tarfile``); samples are then read
    by seeking into the shard. Shards must be uncompressed. Keys without an image (for instance a
    failed download that kept its .txt/.json) are skipped, counted in ``num_missing_image`` and logged.
    File handles are opened lazily and per process, so DataLoader workers never share a file offset.
    """

    def __init__(self, pattern: str | os.PathLike, load_size: int = DEFAULT_LOAD_SIZE) -> None:
        super().__init__(load_size)
        self.pattern = os.fspath(pattern)
        self.shards = _shard_paths(pattern)
        self.samples: list[_TarSample] = []
        self.num_missing_image = 0
        for shard in range(len(self.shards)):
            self._index_shard(shard)
        if not self.samples:
            raise DataError(f"no images in tar shards {self.pattern} ({len(self.shards)} shards, no key with an image)")
        self._handles: OrderedDict[int, BinaryIO] = OrderedDict()
        self._handles_pid = os.getpid()

    def _index_shard(self, shard: int) -> None:
        path = self.shards[shard]
        file_size = path.stat().st_size
        members: dict[str, dict[str, tuple[int, int]]] = {}  # key -> extension -> (offset, size)
        try:
            archive = tarfile.open(path, mode="r:")
        except (tarfile.TarError, OSError) as error:
            raise DataError(
                f"cannot read tar shard {path}: {error} (expected an uncompressed .tar in WebDataset layout)"
            ) from None
        with archive:
            try:
                for member in archive:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > file_size:
                        raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                    parts = _split_member_name(member.name)
                    if parts is not None:
                        members.setdefault(parts[0], {})[parts[1]] = (member.offset_data, member.size)
            except tarfile.ReadError as error:
                # a shard cut short by an interrupted download: keep its complete members
                logger.warning(
                    "tar shard %s is truncated (%s); indexing the %d keys before it", path, error, len(members)
                )
        with open(path, "rb") as raw:
            for key, parts in members.items():
                image = next((parts[e] for e in _TAR_IMAGE_EXTENSIONS if e in parts), None)
                if image is None:
                    self.num_missing_image += 1
                    logger.warning(
                        "tar shard %s: key %s has no image (members: %s); skipped",
                        path, key, ", ".join(f"{key}.{e}" for e in parts),
                    )
                    continue
                label = -1
                if "cls" in parts:
                    offset, size = parts["cls"]
                    raw.seek(offset)
                    text = raw.read(size).decode("utf-8", errors="replace").strip()
                    if not text.isdigit():
                        raise DataError(f"tar shard {path}: {key}.cls holds {text!r}, expected an integer label >= 0")
                    label = int(text)
                text_offset, text_size = parts.get("txt", (-1, 0))
                self.samples.append(_TarSample(shard, key, image[0], image[1], text_offset, text_size, label))

    def _shard_file(self, shard: int) -> BinaryIO:
        if self._handles_pid != os.getpid():  # forked: the parent's handles share its file offsets
            self._handles = OrderedDict()
            self._handles_pid = os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = open(self.shards[shard], "rb")
            self._handles[shard] = handle
            if len(self._handles) > _MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(shard)
        return handle

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        handle = self._shard_file(shard)
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise OSError(f"short read in {self.shards[shard]} at offset {offset}: the shard changed since indexing")
        return data

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # open files cannot be pickled (spawned DataLoader workers)
        state["_handles"] = OrderedDict()
        return state

    def close(self) -> None:
        """Close this process's shard file handles (reopened on the next read)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, index: int) -> BinaryIO:
        sample = self.samples[index]
        return io.BytesIO(self._read(sample.shard, sample.image_offset, sample.image_size))

    def _name(self, index: int) -> str:
        sample = self.samples[index]
        return f"{self.shards[sample.shard]}:{sample.key}"

    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        sample = self.samples[index]
        captions = []
        if sample.text_offset >= 0:
            text = self._read(sample.shard, sample.text_offset, sample.text_size)
            captions.append(text.decode("utf-8", errors="replace").strip())
        labels = [sample.label] if sample.label >= 0 else []
        return {"label": sample.label, "labels": labels, "captions": captions}

    def describe(self) -> str:
        missing = f", {self.num_missing_image} keys without image skipped" if self.num_missing_image else ""
        return f"tar shards {self.pattern}: {len(self)} samples in {len(self.shards)} shards{missing}"


# ---------------------------------------------------------------------------------------------------
# Specs


def _is_shard_folder(folder: Path) -> bool:
    """A folder of shards holds ``*.tar`` files and no images at its top level (img2dataset also writes
    ``*.parquet`` and ``*_stats.json`` beside its shards)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    return any(n.endswith(".tar") for n in names) and not any(_is_image_name(n) for n in names)


def _parse_value(text: str, kind: type, name: str, spec: str) -> Any:
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise DataError(f"parameter {name}={text!r} in {spec!r} must be an integer") from None
    return text


def _open_synthetic(spec: str, load_size: int | None) -> Source:
    # imported here because synthetic.py builds on this module's Source and make_sample
    from wildssl.data.synthetic import SyntheticScenes

    generators = {"scenes": SyntheticScenes}
    name, _, query = spec[len("synthetic:") :].partition("?")
    if name not in generators:
        raise DataError(f"unknown synthetic source {name!r} in {spec!r} (valid: {', '.join(generators)})")
    generator = generators[name]
    types = generator.QUERY_PARAMETERS
    params: dict[str, Any] = {}
    for part in query.split("&") if query else []:
        key, equals, value = part.partition("=")
        if key not in types:
            raise DataError(f"unknown parameter {key!r} in {spec!r} (valid: {', '.join(types)})")
        if not equals:
            raise DataError(f"parameter {key!r} in {spec!r} has no value (write {key}=...)")
        if key in params:
            raise DataError(f"parameter {key!r} given twice in {spec!r}")
        params[key] = _parse_value(value, types[key], key, spec)
    return generator(**params, load_size=None if load_size is None else _check_load_size(load_size))


def open_source(spec: str, load_size: int | None = None) -> Source:
    """Open a data source from a spec string.

    ``spec``: an image folder, a ``.jsonl`` manifest, tar shards (a ``.tar``, a folder of them, a glob
    or a brace pattern such as ``data/{00000..00009}.tar``) or ``synthetic:scenes?n=2000&size=64&seed=0&
    split=train&num_classes=8`` (query values typed; see :class:`~wildssl.data.synthetic.SyntheticScenes`).
    ``load_size``: side of the returned square images; ``None`` means 224 for files and the render
    ``size`` for synthetic scenes.
    """
    if spec.startswith("synthetic:"):
        return _open_synthetic(spec, load_size)
    size = DEFAULT_LOAD_SIZE if load_size is None else load_size
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return TarShards(path, size) if _is_shard_folder(path) else ImageFolder(path, size)
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return JsonlManifest(path, size)
        if path.suffix.lower() == ".tar":
            return TarShards(path, size)
        raise DataError(f"unsupported data file {spec}: {EXPECTED_SPEC}")
    if "{" in spec or _GLOB_CHARS.search(spec):
        return TarShards(os.path.expanduser(spec), size)
    raise DataError(f"data path not found: {spec} ({EXPECTED_SPEC})")
