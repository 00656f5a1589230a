"""Masked image modeling on scene photos: MAE, I-JEPA, iBOT, SlotMIM and DINO at equal images seen.

Each method runs its ``*_quick`` recipe on the same unlabeled scene images (CamVid train frames and COCO
mini train2017 images of ../shared/data, no test image among them) with the same encoder for all: the
recipe's ViT with ``--set`` overrides common to every run (``--arch``), and the same budget in images
seen (``train.images``). Every run then gets the same evaluation, and so does the random-init floor:

- k-NN (k=20, T=0.07) of pooled features on CIFAR-10 (10,000 train / 3,000 test, 32 px upsampled to the
  encoder's size): what the scene pre-training transfers to object classes;
- a linear per-patch segmentation probe on CamVid (SegNet train -> test split, mIoU with "Unlabelled"
  ignored): the patch-level figure the issue asks for.

CPU run (the committed table)::

    OMP_NUM_THREADS=2 python benchmarks/masked_scenes.py --shared ../shared/data --out /tmp/masked_scenes \\
        --table benchmarks/masked_scenes.md

Smoke test of the harness on synthetic scenes in seconds: ``--smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_suite import prepare, smoke_spec, wildssl  # noqa: E402  (the benchmarks are scripts beside each other)

METHODS = ("mae", "ijepa", "ibot", "slotmim", "dino")
# One encoder for every method: a 4-block ViT, width 128, patch 8, at 64 px (64 patches per image).
ARCH = ["model.name=tiny", "model.depth=4", "model.embed_dim=128", "model.num_heads=4", "model.patch_size=8",
        "model.img_size=64", "data.load_size=64"]
# Each recipe's crops follow the encoder's size (the quick recipes crop at 32 px).
CROPS = {"mae": ["method.crop_size=64"], "ijepa": ["method.crop_size=64"], "slotmim": ["method.crop_size=64"],
         "ibot": ["method.global_size=64", "method.local_size=32"],
         "dino": ["method.global_size=64", "method.local_size=32"]}
SMOKE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=8"]


def suite(spec: dict[str, str], image_size: int, smoke: bool) -> dict:
    quick = {"epochs": 1, "lrs": [1e-3]} if smoke else {"epochs": 10, "ignore_index": 11}
    return {"image_size": image_size, "load_size": None, "batch_size": 256, "seed": 0, "probes": {
        "knn": {"train": spec["cifar_train"], "test": spec["cifar_test"]},
        "segment": {"train": spec["camvid_train"], "test": spec["camvid_test"], "image_size": image_size, **quick},
    }}


def scene_images(spec: dict[str, str], out: Path, smoke: bool) -> str:
    """The unlabeled training stream: CamVid train frames + COCO mini train2017 images (no captions)."""
    if smoke:
        return spec["scenes"]
    records = []
    for name in ("camvid_train", "coco_train"):
        records += [{"file": json.loads(line)["file"]} for line in Path(spec[name]).read_text().splitlines() if line]
    path = out / "scene_images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def markdown(results: dict, command: str, started: str, seconds: float, load: str, images: int) -> str:
    lines = ["# Masked image modeling on scene photos, at equal images seen", "", f"Command: `{command}`", "",
             f"Date: {started}; total wall time {seconds / 60:.1f} min; machine: {load}.", "",
             f"Every method saw {images:,} images (views of the CamVid train frames and COCO mini train2017 "
             "images), on the same encoder (ViT depth 4, width 128, patch 8, 64 px); `random init` is that "
             "encoder at initialization. k-NN: top-1 on CIFAR-10 (transfer to object classes); CamVid mIoU: "
             "a linear per-patch probe on frozen patch tokens, Unlabelled ignored.", "",
             "| encoder | evaluated network | steps | k-NN top-1 (%) | CamVid mIoU (%) | training (s) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        probes = r["probes"]
        lines.append(f"| {name} | {r.get('network', '-')} | {r.get('steps', '-')} | "
                     f"{100 * probes['knn']['top1']:.1f} | {100 * probes['segment']['miou']:.1f} | "
                     f"{r.get('train_seconds', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    parser.add_argument("--out", required=True, help="runs, prepared data, feature cache and reports")
    parser.add_argument("--table", help="write the Markdown table here (e.g. benchmarks/masked_scenes.md)")
    parser.add_argument("--images", type=int, default=19_200, help="images seen by every method (train.images)")
    parser.add_argument("--only", choices=METHODS, action="append", help="train and evaluate only these")
    parser.add_argument("--smoke", action="store_true", help="synthetic scenes, tiny settings: checks the harness")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, start = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    load = f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f}"
    spec = smoke_spec() if args.smoke else prepare(Path(args.shared), out / "data")
    images = 16 if args.smoke else args.images
    image_size = 32 if args.smoke else 64
    arch = ARCH + (SMOKE + ["model.img_size=32", "data.load_size=32"] if args.smoke else [])
    train_stream = scene_images(spec, out, args.smoke)
    (out / "suite.yaml").write_text(yaml.safe_dump(suite(spec, image_size, args.smoke), sort_keys=False))
    common = ["--suite", str(out / "suite.yaml"), "--cache-dir", str(out / "cache"), "--json"]
    results: dict[str, dict] = {}
    methods = args.only or list(METHODS)
    for method in methods:
        run = out / "runs" / method
        if not (run / "checkpoint.safetensors").is_file():
            began = time.perf_counter()
            crops = [c.replace("=64", "=32").replace("local_size=32", "local_size=16") for c in CROPS[method]] \
                if args.smoke else CROPS[method]
            argv = ["train", f"{method}_quick", "--out", str(run), "--data", train_stream]
            for item in arch + crops + [f"train.images={images}", "train.progress=false",
                                        "train.checkpoint_every=0", "eval.knn_every=0"]:
                argv += ["--set", item]
            wildssl(*argv)
            (run / "train_seconds.txt").write_text(f"{time.perf_counter() - began:.0f}")
        if method == methods[0]:
            figures = json.loads(wildssl("eval", "all", str(run), "--random-init", "--seed", "0",
                                         "--out", str(out / "eval" / "random_init"), *common))
            results["random init"] = {"probes": figures["probes"], "network": "random-init"}
        figures = json.loads(wildssl("eval", "all", str(run), "--out", str(out / "eval" / method), *common))
        steps = max(json.loads(line).get("step", 0) for line in (run / "metrics.jsonl").read_text().splitlines())
        results[method] = {"probes": figures["probes"], "network": figures.get("network"), "steps": steps,
                           "train_seconds": (run / "train_seconds.txt").read_text()}
        print(json.dumps({"encoder": method, **{k: results[method]["probes"][k] for k in ("knn", "segment")}},
                         default=str), flush=True)
    seconds = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"started": started, "load": load, "seconds": round(seconds),
                                                  "images": images, "results": results}, indent=1, default=str))
    if args.table:
        text = markdown(results, "python " + " ".join(sys.argv), started, seconds, load, images)
        Path(args.table).write_text(text)
        print(text)


if __name__ == "__main__":
    main()
