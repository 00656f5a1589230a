"""The whole evaluation suite on real data, for encoders from the quick recipes and the random-init floor.

Trains DINO, AB_DINO, CLIP and AB_CLIP with their ``*_quick`` recipes on the shared real data, then runs
``wildssl eval all`` on each and on the same architecture at its initialization, and writes a Markdown
table (``--table``) plus every report under ``--out``:

- classification probes (k-NN, linear, attentive, decoder, few-shot) on CIFAR-10 (``cifar10_carry.npz``:
  10,000 train / 3,000 test images, 32 px);
- box-conditioned object classification (decoder) and CorLoc (discovery) on COCO mini (train2017 images
  with instances -> val2017 images with instances), at 64 px;
- linear segmentation (mIoU, "Unlabelled" ignored) on CamVid (SegNet train -> test split), at 64 px.

Training streams never hold an evaluation test image: DINO trains on the CIFAR-10 train images; CLIP on
the captions of Flickr8k mini and COCO train2017; AB's bootstrap stream is unlabeled scene images
(COCO train2017, CamVid train, Flickr8k mini). The four quick recipes share one ViT (tiny, depth 4,
width 128, patch 8, 32 px), so one random-init floor (seed 0, the runs' own initial weights) serves all.

CPU run (the committed table)::

    OMP_NUM_THREADS=2 nice -n 5 python benchmarks/eval_suite.py --shared ../shared/data --out /tmp/evalsuite \\
        --table benchmarks/eval_suite.md

GPU, ViT-S/16 scale (owed, see benchmarks/README.md): ``--scale small16`` trains ViT-S/16 at 224 px for
``--steps`` and evaluates at 224 px (the 32-px CIFAR images upsampled).
Smoke test of the harness on synthetic scenes in seconds: ``--smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_vs_base import cifar_folders  # noqa: E402  (the benchmarks are scripts beside each other)

METHODS = ("dino", "ab_dino", "clip", "ab_clip")
# name in the table -> (probe entry, figure)
COLUMNS = (
    ("k-NN", "knn", "top1"), ("linear", "linear", "top1"), ("attentive", "attentive", "top1"),
    ("decoder (image)", "decoder", "image_top1"), ("5-way 5-shot", "fewshot", "accuracy"),
    ("COCO box cls", "decoder@coco", "box_top1"), ("COCO CorLoc", "discovery", "corloc"),
    ("CamVid mIoU", "segment", "miou"),
)
SCALES = {
    # the quick recipes' own architecture and resolution
    "quick": {"overrides": [], "image_size": 32, "dense_size": 64, "load_size": 32},
    # ViT-S/16 at 224 px (GPU)
    "small16": {"overrides": ["model.name=small", "model.depth=null", "model.embed_dim=null", "model.num_heads=null",
                              "model.patch_size=16", "model.img_size=224", "data.load_size=224"],
                "image_size": 224, "dense_size": 224, "load_size": 224},
}
CROPS = {  # the quick recipes crop at 32 px; at ViT-S/16 scale the crops follow the image size
    "quick": {},
    "small16": {"dino": ["method.global_size=224", "method.local_size=96"], "clip": ["method.crop_size=224"]},
}


def write_manifest(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def prepare(shared: Path, out: Path) -> dict[str, str]:
    """Class folders for CIFAR-10 and manifests with absolute paths for the other sets."""
    out.mkdir(parents=True, exist_ok=True)
    cifar_train, cifar_test = cifar_folders(shared / "cifar10_carry.npz", out / "cifar", None)

    def read(name: str) -> list[dict]:
        folder = shared / name
        records = [json.loads(line) for line in (folder / "annotations.jsonl").read_text().splitlines() if line]
        for r in records:
            r["file"] = str(folder / r["file"])
            if r.get("mask"):
                r["mask"] = str(folder / r["mask"])
        return records

    coco, camvid, flickr = read("coco_mini"), read("camvid_scenes"), read("flickr8k_mini")
    coco_train = [r for r in coco if r["coco_split"] == "train2017"]
    spec = {
        "cifar_train": cifar_train, "cifar_test": cifar_test,
        "coco_train": write_manifest(out / "coco_train.jsonl", [r for r in coco_train if r["has_instances"]]),
        "coco_test": write_manifest(out / "coco_val.jsonl", [r for r in coco if r["coco_split"] == "val2017"
                                                             and r["has_instances"]]),
        "camvid_train": write_manifest(out / "camvid_train.jsonl", [r for r in camvid if r["split"] == "train"]),
        "camvid_test": write_manifest(out / "camvid_test.jsonl", [r for r in camvid if r["split"] == "test"]),
        "captions": write_manifest(out / "captions.jsonl", [{"file": r["file"], "captions": r["captions"]}
                                                             for r in flickr + coco_train]),
        "scenes": write_manifest(out / "scenes.jsonl", [{"file": r["file"]} for r in
                                                        coco_train + [c for c in camvid if c["split"] == "train"]
                                                        + flickr]),
    }
    return spec


def smoke_spec() -> dict[str, str]:
    scenes = "synthetic:scenes?n={n}&size=32&colours=2&split={split}"
    train, test = scenes.format(n=64, split="train"), scenes.format(n=48, split="test")
    return {"cifar_train": train, "cifar_test": test, "coco_train": train, "coco_test": test, "camvid_train": train,
            "camvid_test": test, "captions": train, "scenes": scenes.format(n=64, split="train") + "&seed=1"}


def suite(spec: dict[str, str], scale: dict, smoke: bool) -> dict:
    dense = {"image_size": scale["dense_size"]}
    quick = {"epochs": 1, "lrs": [1e-3, 1e-2]} if smoke else {}
    cifar = {"train": spec["cifar_train"], "test": spec["cifar_test"]}
    # fewer epochs than the probes' defaults for the token probes on 10,000 images: the CPU budget
    token_budget = quick or {"epochs": 10, "batch_size": 256}
    return {"image_size": scale["image_size"], "load_size": None, "batch_size": 256, "seed": 0, "probes": {
        "knn": cifar,
        "linear": {**cifar, **quick},
        "attentive": {**cifar, **token_budget},
        "decoder": {**cifar, **token_budget},
        "fewshot": {"data": spec["cifar_test"], **({"episodes": 20, "k_shot": 1, "n_query": 3} if smoke else {})},
        "decoder@coco": {"train": spec["coco_train"], "test": spec["coco_test"], **dense, **quick},
        "discovery": {"data": spec["coco_test"], **dense},
        "segment": {"train": spec["camvid_train"], "test": spec["camvid_test"], **dense,
                    **(quick or {"epochs": 10, "ignore_index": 11})},
    }}


def wildssl(*argv: str) -> str:
    result = subprocess.run([sys.executable, "-m", "wildssl.cli", *argv], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"wildssl {' '.join(argv[:3])} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def train_overrides(method: str, spec: dict[str, str], steps: int, scale_name: str, smoke: bool) -> list[str]:
    base = method.removeprefix("ab_")
    data = spec["captions"] if base == "clip" else spec["cifar_train"]
    streams = ([f"data.annotation={data}", f"data.bootstrap={spec['scenes']}"] if method.startswith("ab_")
               else [f"data.train={data}"])
    tiny = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=16"] if smoke else []
    ab_crop = ["method.ab_crop_size=224"] if scale_name == "small16" and method.startswith("ab_") else []
    return (streams + SCALES[scale_name]["overrides"] + CROPS[scale_name].get(base, []) + ab_crop + tiny
            + [f"train.steps={steps}", "train.progress=false", "train.checkpoint_every=0", "eval.knn_every=0"])


def markdown(results: dict[str, dict], command: str, started: str, seconds: float, load: str, scale: str,
             suite_text: str) -> str:
    names = list(results)
    lines = [f"# The evaluation suite on real data ({scale} scale)", "",
             f"Command: `{command}`", "", f"Date: {started}; total wall time {seconds / 60:.1f} min; "
             f"machine: {load}.", "",
             "Figures in percent (few-shot: mean over 600 episodes, with its 95% interval). Encoders from the "
             "quick recipes on real data (module docstring of `benchmarks/eval_suite.py`); `random init` is the "
             "same architecture at the runs' initial weights, the floor of every column.", "",
             "| encoder | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name in names:
        probes = results[name]["probes"]
        cells = []
        for _, probe, figure in COLUMNS:
            value = probes.get(probe, {}).get(figure)
            cell = "-" if value is None else f"{100 * value:.1f}"
            if probe == "fewshot" and value is not None:
                cell += f" ± {100 * probes[probe]['ci95']:.1f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Chosen settings and baselines:", ""]
    for name in names:
        probes = results[name]["probes"]
        coco = probes["decoder@coco"]
        parts = [f"linear: {probes['linear']['pool']} pooling, lr {probes['linear']['lr']:g}",
                 f"attentive lr {probes['attentive']['lr']:g}", f"decoder lr {probes['decoder']['lr']:g}",
                 f"segmentation lr {probes['segment']['lr']:g}"]
        if "box_majority_baseline" in coco:
            parts.append(f"COCO boxes: majority class {100 * coco['box_majority_baseline']:.1f}% of "
                         f"{coco['num_test_boxes']} test boxes")
        if "image_precision_at_1" in coco:
            parts.append(f"COCO multi-label precision@1 {100 * coco['image_precision_at_1']:.1f}%")
        lines.append(f"- {name}: " + "; ".join(parts))
    lines += ["", "Wall time per probe (s), feature extraction included where the probe first needs the data:", "",
              "| encoder | " + " | ".join(results[names[0]]["probes"]) + " | training (s) |",
              "|---|" + "---|" * (len(results[names[0]]["probes"]) + 1)]
    for name in names:
        probes = results[name]["probes"]
        lines.append(f"| {name} | " + " | ".join(f"{p['seconds']:.0f}" for p in probes.values())
                     + f" | {results[name].get('train_seconds', '-')} |")
    lines += ["", "The suite file the script wrote (paths under `--out`):", "", "```yaml", suite_text.strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    parser.add_argument("--out", required=True, help="runs, prepared data, feature cache and reports")
    parser.add_argument("--table", help="write the Markdown table here (e.g. benchmarks/eval_suite.md)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each quick run")
    parser.add_argument("--scale", choices=list(SCALES), default="quick")
    parser.add_argument("--only", choices=METHODS, action="append", help="train and evaluate only these")
    parser.add_argument("--smoke", action="store_true", help="synthetic scenes, tiny settings: checks the harness")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, start = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    load = f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f}"
    spec = smoke_spec() if args.smoke else prepare(Path(args.shared), out / "data")
    scale = SCALES[args.scale]
    (out / "suite.yaml").write_text(yaml.safe_dump(suite(spec, scale, args.smoke), sort_keys=False))
    steps = 2 if args.smoke else args.steps
    common = ["--suite", str(out / "suite.yaml"), "--cache-dir", str(out / "cache"), "--json"]
    results: dict[str, dict] = {}
    methods = args.only or list(METHODS)
    for method in methods:
        run = out / "runs" / method
        if not (run / "checkpoint.safetensors").is_file():
            began = time.perf_counter()
            argv = ["train", f"{method}_quick", "--out", str(run)]
            for item in train_overrides(method, spec, steps, args.scale, args.smoke):
                argv += ["--set", item]
            wildssl(*argv)
            (run / "train_seconds.txt").write_text(f"{time.perf_counter() - began:.0f}")
        if method == methods[0]:  # the floor: the first run's architecture at its initial weights
            figures = json.loads(wildssl("eval", "all", str(run), "--random-init", "--seed", "0",
                                        "--out", str(out / "eval" / "random_init"), *common))
            results["random init"] = {"probes": figures["probes"]}
            print(json.dumps({"encoder": "random init", "seconds": figures["seconds"]}), flush=True)
        figures = json.loads(wildssl("eval", "all", str(run), "--out", str(out / "eval" / method), *common))
        results[method] = {"probes": figures["probes"], "train_seconds": (run / "train_seconds.txt").read_text()}
        print(json.dumps({"encoder": method, "seconds": figures["seconds"]}), flush=True)
    (out / "results.json").write_text(json.dumps({"started": started, "load": load, "seconds":
                                                  round(time.perf_counter() - start), "results": results}, indent=1))
    if args.table:
        command = "python " + " ".join(sys.argv)
        text = markdown(results, command, started, time.perf_counter() - start, load, args.scale,
                        (out / "suite.yaml").read_text())
        Path(args.table).write_text(text)
        print(text)


if __name__ == "__main__":
    main()
