"""Image folders: every image file under a root; class subfolders become labels."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from wildssl.data.decode import DEFAULT_MAX_PIXELS, EXPECTED_SPEC, IMAGE_EXTENSIONS, FileSource, warn_once
from wildssl.data.sample import DEFAULT_LOAD_SIZE
from wildssl.errors import DataError

log = logging.getLogger("wildssl.data")

# Folder names of a data set's splits: a folder whose would-be classes are all of these holds splits, not classes.
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "dev", "eval", "test", "testing")
TRAIN_SPLITS = ("train", "training")


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


# Photo formats a folder may hold that wildssl does not decode (beside those Pillow opens but IMAGE_EXTENSIONS does not
# list): a folder of them is named in a warning instead of shrinking without a word.
OTHER_PHOTO_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".raf")


def _left_out_kind(name: str) -> str | None:
    """The extension of a file that is a photo wildssl does not read (HEIC, AVIF, camera raw, or another format
    Pillow opens), else None (an image it reads, a hidden file, or a file of another kind: text, JSON, ...)."""
    if name.startswith(".") or is_image_name(name):
        return None
    suffix = os.path.splitext(name)[1].lower()
    if suffix in OTHER_PHOTO_EXTENSIONS or suffix in _pillow_extensions():
        return suffix
    return None


@functools.cache
def _pillow_extensions() -> frozenset[str]:
    """The extensions of the formats Pillow opens (its plugins register them when first asked)."""
    from PIL import Image

    return frozenset(ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def _scan_images(root: Path) -> list[str]:
    """Relative POSIX paths of all image files under ``root``, sorted. Hidden files and folders
    (``.git``, macOS ``._x.jpg`` resource forks) are skipped. The folders themselves are read first, in sorted order,
    then the symlinked folders among them, each target once: a link inside one class folder to another class's
    folder (``cats/also_birds -> ../birds``) does not take that class's images, whatever order the file system lists
    them in. A folder that cannot be read and photos of kinds wildssl does not decode are named in a warning."""
    found: list[str] = []
    seen: set[str] = set()
    links: list[tuple[str, str]] = []  # (a symlinked folder, its path relative to root), read after the real ones
    left_out: dict[str, int] = {}

    def unreadable(error: OSError) -> None:
        warn_once(log, ("unreadable folder", error.filename), "image folder %s: cannot read %s (%s), so its images are "
                  "left out", root, error.filename, error.strerror or error)

    def read(top: str, relative_top: str) -> None:
        for folder, subfolders, files in os.walk(top, onerror=unreadable):
            real = os.path.realpath(folder)
            if real in seen:  # a symlink loop or a second link to the same folder
                subfolders[:] = []
                continue
            seen.add(real)
            relative = os.path.relpath(folder, top)
            relative = relative_top if relative == "." else f"{relative_top}{Path(relative).as_posix()}/"
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            links.extend((os.path.join(folder, d), f"{relative}{d}/") for d in subfolders
                         if os.path.islink(os.path.join(folder, d)))
            found.extend(relative + name for name in files if is_image_name(name))
            for name in files:
                kind = _left_out_kind(name)
                if kind is not None:
                    left_out[kind] = left_out.get(kind, 0) + 1

    read(str(root), "")
    while links:
        link, relative = links.pop(0)
        if os.path.realpath(link) not in seen:
            read(link, relative)
    if left_out:
        kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(left_out.items(), key=lambda kv: -kv[1]))
        warn_once(log, ("left out", str(root.resolve())), "image folder %s: %d photos of kinds wildssl does not read "
                  "are left out (%s); convert them to JPEG or PNG to train on them (it reads %s)", root,
                  sum(left_out.values()), kinds, " ".join(IMAGE_EXTENSIONS))
    return sorted(found)


def _class_folders(paths: list[str]) -> list[str | None]:
    """The class folder of each image path: its first folder below the folders that wrap every image (``Images`` of
    ``root/Images/<class>/x.ppm``, as data sets often ship), or None for an image that lies directly there."""
    parts = [p.split("/") for p in paths]
    depth = 0  # wrapping folders: one name shared by every path, each path at least a class folder deeper
    while all(len(x) >= depth + 3 for x in parts) and len({x[depth] for x in parts}) == 1:
        depth += 1
    return [x[depth] if len(x) >= depth + 2 else None for x in parts]


def _refuse_splits_as_classes(root: Path, paths: list[str], first_parts: list[str | None],
                              class_names: list[str]) -> None:
    """A DataError when the class folders found are all split names (``root/train/<class>/...`` beside
    ``root/test/...``): taken as classes, they would label every image by its split and train on the test images."""
    if not all(name.lower() in SPLIT_NAMES for name in class_names):
        return  # classes of another kind (a real class named like a split among them stays a class)
    where = {}  # each split's folder below root, wrapping folders included
    for path, part in zip(paths, first_parts):
        names = path.split("/")
        where.setdefault(part, "/".join(names[: names.index(part) + 1]))
    train = next((name for name in class_names if name.lower() in TRAIN_SPLITS), None)
    held_out = next((name for name in class_names if name.lower() not in TRAIN_SPLITS), None)
    hint = (f"{root / where[train]} to train on, {root / where[held_out]} to evaluate on" if train and held_out else
            "one to train on, another to evaluate on")
    raise DataError(f"image folder {root} holds the splits {', '.join(class_names)}, not classes: pass a split "
                    f"folder itself ({hint}), each with its class subfolders")


class ImageFolder(FileSource):
    """Every image file under ``root`` (recursive; any of :data:`~wildssl.data.decode.IMAGE_EXTENSIONS` in any
    case), in sorted path order.

    When every image lies inside a first-level subfolder and there are at least two such subfolders,
    their sorted names are the classes (the usual ``root/<class>/...`` layout); otherwise labels are -1.
    Folders that wrap everything are looked through: ``root/Images/<class>/...`` has the classes of
    ``root/Images``. A single subfolder is not taken as a class: ``root/images/*.jpg`` is an unlabelled folder.
    """

    def __init__(self, root: str | os.PathLike, load_size: int = DEFAULT_LOAD_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(load_size, max_pixels)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root} ({EXPECTED_SPEC})")
        self.paths = _scan_images(self.root)
        if not self.paths:
            raise DataError(
                f"no images in folder {self.root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)} files)"
            )
        first_parts = _class_folders(self.paths)
        class_names = sorted({part for part in first_parts if part is not None})
        if None not in first_parts and len(class_names) >= 2:  # an image beside the folders: an unlabelled pool
            _refuse_splits_as_classes(self.root, self.paths, first_parts, class_names)
            self.classes = class_names
            position = {name: i for i, name in enumerate(class_names)}
            self.labels = [position[part] for part in first_parts]
        else:
            self.classes = None
            self.labels = [-1] * len(self.paths)
            if len(class_names) == 1 and None not in first_parts:  # a probe then said "unlabelled" of cat/
                log.info("image folder %s: every image is in its one subfolder %s/, so the images are unlabelled "
                         "(class labels need two or more class subfolders)", self.root, class_names[0])
        # Images beside two or more subfolders make the whole folder an unlabelled pool (a photo dump with some
        # folders in it); a stray cover.png beside cat/ and dog/ does the same, so say which images decided it.
        self.loose = [path for path, part in zip(self.paths, first_parts) if part is None] if len(class_names) >= 2 else []
        if self.loose:
            warn_once(log, ("loose images", self.root.resolve()),
                      "image folder %s: %s, so the subfolders %s are not read as classes and every image is "
                      "unlabelled; move %s into a subfolder (or out of the folder) to label the images by their "
                      "subfolder", self.root, self._loose_phrase(), ", ".join(class_names[:5]) +
                      (", ..." if len(class_names) > 5 else ""), "it" if len(self.loose) == 1 else "them")

    def __len__(self) -> int:
        return len(self.paths)

    def captioned_count(self) -> int:
        return 0  # a folder of images has no captions

    def class_labels(self) -> list[int]:
        return list(self.labels)

    def _open(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def _name(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        label = self.labels[index]
        return {"label": label, "labels": [label] if label >= 0 else []}

    def _loose_phrase(self) -> str:
        count = len(self.loose)
        return (f"{count} image{'s' if count > 1 else ''} ({self.loose[0]}{', ...' if count > 1 else ''}) "
                f"{'lie' if count > 1 else 'lies'} beside its subfolders")

    def describe(self) -> str:
        if self.classes:
            classes = f"{len(self.classes)} classes"
        else:
            classes = f"no labels ({self._loose_phrase()})" if self.loose else "no labels"
        return f"image folder {self.root}: {len(self)} images, {classes}"
