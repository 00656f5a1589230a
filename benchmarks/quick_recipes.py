"""Quick recipes on real photos: each recipe x data set, trained vs random-init k-NN and wall time.

For every (recipe, data set) it runs, one at a time,

    wildssl train RECIPE --data TRAIN --val TEST --out OUT/RECIPE-DATASET --set eval.knn_every=<total steps>

and reads the run's own figures from its last JSON line: the online k-NN top-1 (k=20, T=0.07) of the
trained encoder and of the same encoder at its random initialization (measured by the engine before
step 0, same network, same pooling), both with the memory taken from the labelled training images and
the test images from ``--val``. It records the wall time of the whole command (training plus the two
k-NN evaluations), the load average before it started, then writes ``results.json`` and a Markdown table
(``table.md``) under ``--out``.

Data sets (converted from ``$WILDSSL_SHARED_DATA`` into ``--out/data``, which must be git-ignored):

- ``cifar10``: the first 5,000 train images of ``cifar10_carry.npz`` (shuffled, about 500 per class)
  and its first 1,000 test images, as class-folder PNGs (32 px, object-centric, 10 classes).
- ``camvid``: regions of the CamVid street frames: the 4 x 3 grid of 42-px squares of every frame,
  labelled by the class covering at least half of the square (from the masks, Unlabelled excluded;
  squares with no such class are left out): about 3,300 squares of the 367 train frames to train on,
  2,100 of the 233 test frames to test on (Road, Building, Sky, Tree, Pavement, Car, ...). The label
  of a whole frame (its largest class) is nearly constant (Road or Building) and shifts between the
  train and the test drives, so k-NN on it measured noise (see ``benchmarks/demo.md``). Manifests with
  integer labels (the CamVid class ids), so that the memory and the test set index classes alike even
  where one lacks a class.
- ``flickr8k``: the 1,000 Flickr8k photos with their captions; label = the scene named by at least two
  of the five captions (:data:`FLICKR_SCENES`, first match wins; images naming none stay unlabelled and
  are used for training only). Train on the official train split, test on dev + test. The captions
  also let the CLIP family (CLIP, SLIP, SiLC) train here.
- ``camvid_objects``: single street objects of the CamVid frames (:func:`camvid_objects`: each connected
  component of Pole, SignSymbol, Car, Pedestrian or Bicyclist at least 8 px on both sides, cut as a square):
  about 1,100 crops of the train frames to train on, 900 of the test and val frames to test on.
- ``cifar10_1700``: the first 1,700 of those train images (the size of the held-out set that issue 6 describes),
  tested on the same 1,000 test images: a small k-NN memory (about 170 per class).
- ``cifar10_fresh0`` / ``cifar10_fresh1`` / ``cifar10_fresh2``: three disjoint draws of 1,700 train images each
  from ``cifar10_jpeg_full.npz``, none of them in ``cifar10_carry.npz`` (so no recipe was tuned on them), tested on
  1,000 test images also outside the carry file (:func:`prepare_cifar10_fresh`). Not class-balanced: a random
  draw, as a user's folder is.
- ``cifar10_fresh3`` / ``cifar10_fresh4`` (not in the default run): two more such draws, disjoint from the first
  three, on which the nineteenth round tried SimCLR settings, so that draws 0-2 stay untuned.
- ``cifar10_all`` (not trained on by default): every image of ``cifar10_carry.npz``, the set of the 5-fold
  k-NN of ``benchmarks/knn_folds.py`` for CIFAR-10 runs.

``--smoke``: tiny models on a few synthetic and converted images for a few steps, in seconds; it checks
the harness, not the recipes.

Example (the table in ``benchmarks/demo.md``):

    python benchmarks/quick_recipes.py --recipes simclr_quick dino_quick --datasets cifar10 camvid flickr8k \\
        --out .carry/quick
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from wildssl.benchmark.prepare import FLICKR_MIN_CAPTIONS, FLICKR_SCENES

DATASETS = ("cifar10", "camvid", "flickr8k", "camvid_objects", "cifar10_1700", "cifar10_fresh0", "cifar10_fresh1",
            "cifar10_fresh2")
CAPTIONED = ("flickr8k",)  # the data sets whose images carry captions (needed by the CLIP family)
CAPTION_METHODS = ("clip", "slip", "silc", "ab_clip")

CIFAR_TRAIN_IMAGES = 5000
CIFAR_SMALL_TRAIN_IMAGES = 1700  # the size of the held-out set of issue 6 (32 px, 43 classes)
CIFAR_TEST_IMAGES = 1000
FRESH_SEED = 2026  # the order the cifar10_fresh draws are taken from
CAMVID_UNLABELLED = 11  # the class id of "Unlabelled" in camvid_scenes/categories.json
CAMVID_REGION = 42  # pixels: a 4 x 3 grid of squares on the 171 x 128 frames
# camvid_objects: the street objects of the masks (Pole, SignSymbol, Car, Pedestrian, Bicyclist), cropped where
# their box is 8 px or more on both sides (of 171 x 128 frames): about 1,100 train and 900 test crops.
CAMVID_OBJECTS = (2, 6, 8, 9, 10)
CAMVID_MIN_OBJECT = 8
# FLICKR_SCENES (class name, caption words) and FLICKR_MIN_CAPTIONS come from wildssl.benchmark.prepare: the
# same rule as the benchmark suites' flickr8k:test set, here with integer labels.

SMOKE_OVERRIDES = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "train.steps=2",
                   "train.batch_size=8", "train.checkpoint_every=0", "train.tensorboard=false"]
SMOKE_METHOD = {
    "simclr": ["method.proj_hidden_dim=32", "method.proj_dim=16"],
    "dino": ["method.n_local=2", "method.out_dim=32", "method.hidden_dim=32", "method.bottleneck_dim=16"],
}


# ----------------------------------------------------------------------------- data sets

def _write_manifest(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_class_folder(folder: Path, classes: list[str], labels: np.ndarray,
                        image_at: Callable[[int], Image.Image]) -> None:
    """``folder/<class>/<rank>.png`` for each label, the image from ``image_at(rank)``; a PNG already there (a
    former conversion) is kept, and its image is not made again."""
    for rank, label in enumerate(labels):
        path = folder / classes[int(label)] / f"{rank:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            image_at(rank).save(path)


def prepare_cifar10(shared: Path, out: Path, train_images: int | None = CIFAR_TRAIN_IMAGES,
                    test_images: int | None = CIFAR_TEST_IMAGES) -> tuple[str, str]:
    """Class-folder PNGs of the carry file's first train / test images (None: all of them); returns the
    (train, test) folders."""
    data = np.load(shared / "cifar10_carry.npz")
    classes = [str(c) for c in data["classes"]]
    for split, count in (("train", train_images), ("test", test_images)):
        images = data[f"x_{split}"]
        _write_class_folder(out / split, classes, data[f"y_{split}"][:count],
                            lambda rank: Image.fromarray(images[rank]))
    return str(out / "train"), str(out / "test")


def camvid_regions(mask: np.ndarray, region: int = CAMVID_REGION) -> list[tuple[tuple[int, int, int, int], int]]:
    """The grid of ``region`` x ``region`` pixel squares of a CamVid mask ``(H, W)`` (class ids, 11 =
    Unlabelled) whose most common class covers at least half of the square: ``[(box x0, y0, x1, y1),
    class id]`` in row-major order."""
    regions = []
    for top in range(0, mask.shape[0] - region + 1, region):
        for left in range(0, mask.shape[1] - region + 1, region):
            counts = np.bincount(mask[top:top + region, left:left + region].ravel(), minlength=CAMVID_UNLABELLED + 1)
            counts = counts[:CAMVID_UNLABELLED]
            if counts.max() * 2 >= region * region:
                regions.append(((left, top, left + region, top + region), int(counts.argmax())))
    return regions


def prepare_camvid(shared: Path, out: Path) -> tuple[str, str]:
    """Manifests of the region squares (PNG) of the CamVid train and test frames, labelled by the class
    covering most of each square (integer CamVid class ids, the same in both manifests)."""
    return _camvid_crops(shared, out, camvid_regions, {"train": ("train",), "test": ("test",)})


def _camvid_crops(shared: Path, out: Path, cut, frames: dict[str, tuple[str, ...]]) -> tuple[str, str]:
    """PNG crops ``cut(mask) -> [(box, class id)]`` of the CamVid frames of each output split (``frames``: the
    CamVid splits it takes its frames from) and their manifests; returns (train, test) manifest paths."""
    root = shared / "camvid_scenes"
    records = [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines() if line.strip()]
    for split, sources in frames.items():
        entries = []
        for r in (r for r in records if r["split"] in sources):
            mask = np.asarray(Image.open(root / r["mask"]))
            with Image.open(root / r["file"]) as frame:
                frame = frame.convert("RGB")
                for k, (box, label) in enumerate(cut(mask)):
                    path = out / split / f"{Path(r['file']).stem}_{k:02d}.png"
                    if not path.exists():
                        path.parent.mkdir(parents=True, exist_ok=True)
                        frame.crop(box).save(path)
                    entries.append({"path": str(path.resolve()), "label": label})
        _write_manifest(out / f"{split}.jsonl", entries)
    return str(out / "train.jsonl"), str(out / "test.jsonl")


def camvid_objects(mask: np.ndarray, classes: tuple[int, ...] = CAMVID_OBJECTS,
                   min_side: int = CAMVID_MIN_OBJECT) -> list[tuple[tuple[int, int, int, int], int]]:
    """The objects of a CamVid mask ``(H, W)``: each 4-connected component of one of ``classes`` whose
    bounding box is at least ``min_side`` pixels on both sides, as ``[(square box x0, y0, x1, y1), class id]``.
    The square has the box's longer side, is centred on the box and is shifted to lie inside the frame."""
    height, width = mask.shape
    seen = np.zeros(mask.shape, dtype=bool)
    objects = []
    for y0, x0 in zip(*np.nonzero(np.isin(mask, classes))):
        if seen[y0, x0]:
            continue
        label, stack = int(mask[y0, x0]), [(int(y0), int(x0))]
        seen[y0, x0] = True
        top, left, bottom, right = y0, x0, y0, x0
        while stack:  # flood fill of one component
            y, x = stack.pop()
            top, left, bottom, right = min(top, y), min(left, x), max(bottom, y), max(right, x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and not seen[ny, nx] and mask[ny, nx] == label:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        h, w = bottom - top + 1, right - left + 1
        if min(h, w) < min_side:
            continue
        side = min(max(h, w), height, width)
        cx, cy = (left + right + 1) // 2, (top + bottom + 1) // 2
        x = min(max(cx - side // 2, 0), width - side)
        y = min(max(cy - side // 2, 0), height - side)
        objects.append(((int(x), int(y), int(x + side), int(y + side)), label))
    return objects


def prepare_camvid_objects(shared: Path, out: Path) -> tuple[str, str]:
    """Manifests of the object crops (PNG) of the CamVid frames: train frames for training, test + val frames
    for the k-NN test (more test objects), labelled by the object's CamVid class id."""
    return _camvid_crops(shared, out, camvid_objects, {"train": ("train",), "test": ("test", "val")})


def flickr_label(captions: list[str]) -> int | None:
    """Index into :data:`FLICKR_SCENES` of the first scene named by >= FLICKR_MIN_CAPTIONS captions."""
    words = [set(re.findall(r"[a-z]+", caption.lower())) for caption in captions]
    for index, (_, keywords) in enumerate(FLICKR_SCENES):
        if sum(bool(w.intersection(keywords)) for w in words) >= FLICKR_MIN_CAPTIONS:
            return index
    return None


def prepare_flickr8k(shared: Path, out: Path) -> tuple[str, str]:
    """Manifests (captions + scene label) of the Flickr8k train split and of dev + test (labelled only)."""
    root = shared / "flickr8k_mini"
    records = [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines() if line.strip()]
    train, test = [], []
    for r in records:
        entry = {"path": str(root / r["file"]), "captions": r["captions"], "label": flickr_label(r["captions"])}
        if r["split"] == "train":
            train.append(entry)
        elif r["split"] in ("dev", "test") and entry["label"] is not None:
            test.append(entry)
    _write_manifest(out / "train.jsonl", train)
    _write_manifest(out / "test.jsonl", test)
    return str(out / "train.jsonl"), str(out / "test.jsonl")


def prepare_cifar10_1700(shared: Path, out: Path) -> tuple[str, str]:
    """The first :data:`CIFAR_SMALL_TRAIN_IMAGES` train images of ``cifar10``, with its test images."""
    return prepare_cifar10(shared, out, CIFAR_SMALL_TRAIN_IMAGES, CIFAR_TEST_IMAGES)


def _decode_jpeg(buffer: np.ndarray, offsets: np.ndarray, index: int) -> Image.Image:
    return Image.open(io.BytesIO(buffer[offsets[index]:offsets[index + 1]].tobytes())).convert("RGB")


def prepare_cifar10_fresh(shared: Path, out: Path, draw: int, train_images: int = CIFAR_SMALL_TRAIN_IMAGES,
                          test_images: int = CIFAR_TEST_IMAGES, draws: int = 3) -> tuple[str, str]:
    """Draw ``draw`` (of ``draws`` disjoint ones) of ``train_images`` train images of ``cifar10_jpeg_full.npz``
    that are not in ``cifar10_carry.npz`` (whose images tuned the recipes), and ``test_images`` test images also
    outside it (the same for every draw), as class-folder PNGs; returns the (train, test) folders."""
    carry = np.load(shared / "cifar10_carry.npz")
    full = np.load(shared / "cifar10_jpeg_full.npz")
    classes = [str(c) for c in full["classes"]]
    for split, count, start in (("train", train_images, draw * train_images), ("test", test_images, 0)):
        labels = full[f"y_{split}"]
        unseen = np.setdiff1d(np.arange(len(labels)), carry[f"{split}_index"])  # sorted
        order = np.random.default_rng(FRESH_SEED).permutation(unseen)
        if split == "train" and draws * count > len(order):
            raise ValueError(f"{draws} draws of {count} images need {draws * count}; {len(order)} are unseen")
        chosen = order[start:start + count]
        buffer, offsets = full[f"jpeg_{split}"], full[f"offsets_{split}"]
        _write_class_folder(out / split, classes, labels[chosen],
                            lambda rank: _decode_jpeg(buffer, offsets, int(chosen[rank])))
    return str(out / "train"), str(out / "test")


def prepare_cifar10_all(shared: Path, out: Path) -> tuple[str, str]:
    """Every image of the carry file (10,000 train, 3,000 test): the set of the 5-fold k-NN
    (``benchmarks/knn_folds.py``) that measures a CIFAR-10 run with a standard error of 0.4 points, where the
    online k-NN on the 1,000 test images of ``cifar10`` has 1.4. Not a training set of this harness."""
    return prepare_cifar10(shared, out, None, None)


PREPARE = {"cifar10": prepare_cifar10, "camvid": prepare_camvid, "flickr8k": prepare_flickr8k,
           "camvid_objects": prepare_camvid_objects, "cifar10_1700": prepare_cifar10_1700,
           "cifar10_all": prepare_cifar10_all,
           **{f"cifar10_fresh{draw}": functools.partial(prepare_cifar10_fresh, draw=draw, draws=5) for draw in range(5)}}


def prepare(dataset: str, shared: Path, out: Path) -> tuple[str, str]:
    """(train SPEC, test SPEC) of ``dataset``, converted under ``out/<dataset>`` on first use."""
    return PREPARE[dataset](shared, out / dataset)


def prepare_smoke(out: Path) -> tuple[str, str]:
    """A labelled 24-image folder (two classes of flat colours) for the smoke run."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for index in range(count):
            name = "red" if index % 2 else "blue"
            colour = np.array((200, 30, 30) if index % 2 else (30, 30, 200))
            pixels = np.clip(colour + rng.integers(-20, 20, (24, 32, 3)), 0, 255).astype(np.uint8)
            path = out / "smoke" / split / name / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return str(out / "smoke" / "train"), str(out / "smoke" / "test")


# ----------------------------------------------------------------------------- runs

def recipe_config(recipe: str, overrides: list[str]) -> dict:
    from wildssl.train.config import build_config

    return build_config(recipe, overrides)


def device_name() -> str:
    """The machine in a few words: CPU count and architecture, or the GPU's name."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU ({platform.machine()})"


def run_one(recipe: str, dataset: str, train: str, test: str, out: Path, overrides: list[str]) -> dict:
    """Train ``recipe`` on ``train`` with the online k-NN on ``test``; returns the run's record."""
    steps = recipe_config(recipe, overrides)["train"]["steps"]
    run_dir = out / "runs" / f"{recipe}-{dataset}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    # k-NN only before the first step (random init) and after the last: more would cost run time.
    argv = ["wildssl", "train", recipe, "--data", train, "--val", test, "--out", str(run_dir)]
    for item in overrides + [f"eval.knn_every={steps}", "train.progress=false"]:
        argv += ["--set", item]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "wildssl.cli", *argv[1:]], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} on {dataset} failed:\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    trained, random = summary["knn_top1"], summary["knn_top1_random_init"]
    return {"recipe": recipe, "dataset": dataset, "trained": trained, "random": random, "gain": trained - random,
            "seconds": round(seconds, 1), "load_before": round(load, 2), "steps": summary["steps"],
            "alarms": summary["alarms"], "date": time.strftime("%Y-%m-%d"), "device": device_name(),
            "command": " ".join(shlex.quote(a) for a in argv)}


def markdown_table(records: list[dict]) -> str:
    """One row per run: k-NN top-1 of the trained and random-init encoders (%), the gain (points), the
    wall time of the command (s), the load average before it, date, device and command."""
    lines = ["| recipe | data | trained | random init | gain | wall s | load before | date | device | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['recipe']} | {r['dataset']} | {100 * r['trained']:.1f}% | {100 * r['random']:.1f}% | "
                     f"{100 * r['gain']:+.1f} | {r['seconds']:.0f} | {r['load_before']:.2f} | {r['date']} | "
                     f"{r['device']} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["simclr_quick", "dino_quick"])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run (repeatable)")
    parser.add_argument("--shared", default=os.environ.get("WILDSSL_SHARED_DATA", "../shared/data"),
                        help="the shared data folder (default $WILDSSL_SHARED_DATA)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a 24-image folder, 2 steps")
    parser.add_argument("--out", required=True, help="output folder (git-ignored, e.g. .carry/quick)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    records = []
    for recipe in args.recipes:
        method = recipe_config(recipe, args.set)["method"]["name"]
        streams = __import__("wildssl.methods", fromlist=["get_method_class"]).get_method_class(method).streams
        for dataset in (["smoke"] if args.smoke else args.datasets):
            if method in CAPTION_METHODS and dataset not in CAPTIONED + ("smoke",):
                print(json.dumps({"recipe": recipe, "dataset": dataset, "skipped": "no captions"}), flush=True)
                continue
            overrides = list(args.set)
            if args.smoke:
                train, test = prepare_smoke(out / "data")
                base = method.removeprefix("ab_")
                overrides = SMOKE_OVERRIDES + SMOKE_METHOD.get(base, []) + overrides
            else:
                train, test = prepare(dataset, Path(args.shared), out / "data")
            if "bootstrap" in streams and not any(o.startswith("data.bootstrap=") for o in overrides):
                overrides.append(f"data.bootstrap={train}")  # AB: the training images, unlabeled, as well
            record = run_one(recipe, dataset, train, test, out, overrides)
            print(json.dumps(record), flush=True)
            records.append(record)
    environment = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
                   "python": platform.python_version(), "torch": __import__("torch").__version__}
    (out / "results.json").write_text(json.dumps({"environment": environment, "runs": records}, indent=1))
    (out / "table.md").write_text(markdown_table(records))
    print(markdown_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
