"""The named data sets of the benchmark suites, converted once from the shared real data.

``wildssl benchmark prepare --shared DIR --out DIR`` (or ``benchmark run``, lazily) writes each set under
``OUT/<name>/`` and returns a data SPEC for it. The shared folder is ``--shared`` or
``$WILDSSL_SHARED_DATA`` (its README describes the files). Sets:

- ``cifar10:train`` / ``cifar10:test``: class-folder PNGs of ``cifar10_carry.npz`` (10,000 train and
  3,000 test images, 32 px, 10 classes, object-centric); ``cifar10:train2k``: the first 2,000 train images
  (the file is shuffled, so about 200 per class), for suites that need several epochs in their budget.
- ``camvid:train`` / ``camvid:test``: the CamVid street frames (SegNet train / test split, 171 x 128) with
  their per-pixel masks (11 classes, 11 = Unlabelled): linear segmentation, scene pre-training.
- ``coco:train`` / ``coco:val``: COCO mini train2017 / val2017 images that have instances (boxes with
  category names, image multi-labels, captions): box-conditioned classification, CorLoc, zero-shot.
- ``flickr8k:train``: the Flickr8k official train split with its captions.
- ``flickr8k:test``: Flickr8k dev + test images labelled by the scene their captions name (the class
  names of :data:`FLICKR_SCENES`, first match wins; images naming none are left out): zero-shot, k-NN.
- ``captions``: captioned photos for image-text pre-training: ``flickr8k:train`` + COCO train2017.
- ``scenes``: unlabeled scene photos: CamVid train + COCO train2017 + Flickr8k train.

No test image of a probe is in a pre-training set: CIFAR-10 test, CamVid test, COCO val2017 and Flickr8k
dev/test stay out of ``captions`` and ``scenes``.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from wildssl.errors import DataError
from wildssl.io import atomic_write_text

SHARED_ENV = "WILDSSL_SHARED_DATA"
# Scene keywords of Flickr8k captions, in priority order: (class name, words of its captions).
FLICKR_SCENES = (
    ("dog", ("dog", "dogs", "puppy", "puppies")),
    ("snow", ("snow", "snowy", "ski", "skier", "skiing", "snowboard", "snowboarder")),
    ("water", ("water", "beach", "ocean", "lake", "river", "pool", "swimming", "surf", "surfer", "wave",
               "waves", "sea", "swims", "splashing")),
    ("street", ("street", "road", "city", "sidewalk", "building", "buildings", "crowd")),
    ("rock", ("rock", "rocks", "rocky", "mountain", "mountains", "cliff", "climbing", "climber", "climbs")),
    ("grass", ("grass", "grassy", "field", "park", "lawn", "yard")),
)
FLICKR_MIN_CAPTIONS = 2  # captions (of 5) that must name a scene for it to be the label
DONE = ".prepared"  # written last in a set's folder: a set without it is converted again


def shared_dir(shared: str | Path | None = None) -> Path:
    """The shared data folder: ``shared``, else ``$WILDSSL_SHARED_DATA``; DataError when neither exists."""
    folder = shared or os.environ.get(SHARED_ENV)
    if not folder:
        raise DataError(f"no shared data folder: pass --shared DIR or set {SHARED_ENV} (the folder holding "
                        "cifar10_carry.npz, camvid_scenes/, coco_mini/, flickr8k_mini/)")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"shared data folder {folder} does not exist (--shared or {SHARED_ENV})")
    return folder


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"missing shared data file {path}; point --shared or {SHARED_ENV} at the shared data folder "
                        "(its README lists the files)")
    return path


_DAMAGED = "the shared data's README gives each file's sha256 to check it against (sha256sum -c SHA256SUMS)"


def _cifar10_arrays(path: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names, images, labels) of ``split`` in ``cifar10_carry.npz``; a DataError naming a damaged file."""
    if not zipfile.is_zipfile(_need(path)):
        raise DataError(f"{path} is not an .npz archive (damaged or another file); {_DAMAGED}")
    try:
        with np.load(path) as data:
            missing = [key for key in ("classes", f"x_{split}", f"y_{split}") if key not in data.files]
            if missing:
                raise DataError(f"{path} has no array {missing[0]!r}; {_DAMAGED}")
            return [str(c) for c in data["classes"]], data[f"x_{split}"], data[f"y_{split}"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} cannot be read ({type(error).__name__}); {_DAMAGED}") from None


def _records(shared: Path, name: str) -> list[dict]:
    """The annotation records of ``shared/name`` with absolute ``file`` (and ``mask``) paths."""
    folder = shared / name
    path = _need(folder / "annotations.jsonl")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            records.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not JSON ({error.msg}); {_DAMAGED}") from None
    for r in records:
        r["file"] = str((folder / r["file"]).resolve())
        if r.get("mask"):
            r["mask"] = str((folder / r["mask"]).resolve())
    return records


def _manifest(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def flickr_label(captions: list[str]) -> str | None:
    """The name of the first scene of :data:`FLICKR_SCENES` named by >= FLICKR_MIN_CAPTIONS captions."""
    words = [set(re.findall(r"[a-z]+", caption.lower())) for caption in captions]
    for name, keywords in FLICKR_SCENES:
        if sum(bool(w.intersection(keywords)) for w in words) >= FLICKR_MIN_CAPTIONS:
            return name
    return None


def _cifar10(split: str, count: int | None = None) -> Callable[[Path, Path], str]:
    def convert(shared: Path, out: Path) -> str:
        classes, images, labels = _cifar10_arrays(shared / "cifar10_carry.npz", split)
        images, labels = images[:count], labels[:count]
        for index, (image, label) in enumerate(zip(images, labels)):
            path = out / classes[int(label)] / f"{index:05d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
        return str(out)
    return convert


def _camvid(split: str) -> Callable[[Path, Path], str]:
    def convert(shared: Path, out: Path) -> str:
        records = [r for r in _records(shared, "camvid_scenes") if r["split"] == split]
        return _manifest(out / "manifest.jsonl", [{"file": r["file"], "mask": r["mask"]} for r in records])
    return convert


def _coco(split: str) -> Callable[[Path, Path], str]:
    def convert(shared: Path, out: Path) -> str:
        records = [r for r in _records(shared, "coco_mini") if r["coco_split"] == split and r["has_instances"]]
        keep = ("file", "captions", "labels", "objects")
        return _manifest(out / "manifest.jsonl", [{k: r[k] for k in keep} for r in records])
    return convert


def _flickr_train(shared: Path, out: Path) -> str:
    records = [r for r in _records(shared, "flickr8k_mini") if r["split"] == "train"]
    return _manifest(out / "manifest.jsonl", [{"file": r["file"], "captions": r["captions"]} for r in records])


def _flickr_test(shared: Path, out: Path) -> str:
    entries = []
    for r in _records(shared, "flickr8k_mini"):
        label = flickr_label(r["captions"])
        if r["split"] in ("dev", "test") and label is not None:
            entries.append({"file": r["file"], "label": label})
    return _manifest(out / "manifest.jsonl", entries)


def _captions(shared: Path, out: Path) -> str:
    flickr = [r for r in _records(shared, "flickr8k_mini") if r["split"] == "train"]
    coco = [r for r in _records(shared, "coco_mini") if r["coco_split"] == "train2017"]
    return _manifest(out / "manifest.jsonl", [{"file": r["file"], "captions": r["captions"]} for r in flickr + coco])


def _scenes(shared: Path, out: Path) -> str:
    camvid = [r for r in _records(shared, "camvid_scenes") if r["split"] == "train"]
    coco = [r for r in _records(shared, "coco_mini") if r["coco_split"] == "train2017"]
    flickr = [r for r in _records(shared, "flickr8k_mini") if r["split"] == "train"]
    return _manifest(out / "manifest.jsonl", [{"file": r["file"]} for r in camvid + coco + flickr])


CATALOGUE: dict[str, Callable[[Path, Path], str]] = {
    "cifar10:train": _cifar10("train"), "cifar10:train2k": _cifar10("train", 2000), "cifar10:test": _cifar10("test"),
    "camvid:train": _camvid("train"), "camvid:test": _camvid("test"),
    "coco:train": _coco("train2017"), "coco:val": _coco("val2017"),
    "flickr8k:train": _flickr_train, "flickr8k:test": _flickr_test,
    "captions": _captions, "scenes": _scenes,
}
TEST_SETS = ("cifar10:test", "camvid:test", "coco:val", "flickr8k:test")  # held-out images only


def is_prepared_name(value: str) -> bool:
    return value in CATALOGUE


def prepare(name: str, shared: str | Path | None, out: str | Path) -> str:
    """The data SPEC of the prepared set ``name``, converted under ``out`` on first use."""
    if name not in CATALOGUE:
        raise DataError(f"unknown prepared data set {name!r}; prepared sets: {', '.join(CATALOGUE)} (or give a data "
                        "SPEC such as synthetic:scenes?n=...)")
    folder = Path(out) / name.replace(":", "_")
    done = folder / DONE
    if done.is_file():
        return done.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    spec = CATALOGUE[name](shared_dir(shared), folder)
    done.write_text(spec + "\n")
    return spec


def prepare_all(shared: str | Path | None, out: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """:func:`prepare` every set of ``names`` (default: the whole catalogue); ``{name: SPEC}``."""
    return {name: prepare(name, shared, out) for name in (names or list(CATALOGUE))}
