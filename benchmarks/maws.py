"""MAWS on real captioned photos: WSP from scratch vs MAE -> WSP at equal WSP steps, then LiT zero-shot on both.

Data (``--shared``, the ``shared/data`` folder): COCO mini (239 images) and Flickr8k mini (1000 images), their
captions mapped to labels through a vocabulary built by ``wildssl vocab build`` from the large caption-only
files (5,000 COCO val2017 + 8,091 Flickr8k images). Stages, each a ``wildssl`` command:

1. ``wildssl vocab build`` -> ``vocabulary.txt`` (``--labels`` most frequent labels);
2. MAE on the 1,239 photos (``--mae-steps``);
3. WSP from scratch and WSP with ``model.init_from`` = the MAE run (``--wsp-steps`` each, same seed and data);
4. LiT on each WSP encoder (``--lit-steps``), then ``wildssl eval zeroshot`` on COCO mini (80 category
   names; an image is right when the prediction is one of its categories);
5. k-NN and the linear probe (``wildssl eval knn`` / ``eval linear``) of the three encoders and the random
   init: COCO mini, each image's largest object as its class (train2017 images -> memory, val2017 -> test),
   and CIFAR-10 (1,000 train / 500 test images of the carry file, at the model's resolution).

CPU run as recorded in ``benchmarks/maws.md`` (``nice -n 5``, 2 shared cores)::

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/maws.py --shared ../shared/data --out /tmp/maws-bench

Prints one JSON line per measurement and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 48  # pixels: 6 x 6 patches of 8
MODEL = ["model.name=tiny", "model.depth=4", "model.embed_dim=128", "model.num_heads=4", "model.patch_size=8",
         f"model.img_size={SIZE}", "data.load_size=56", "data.num_workers=1", "train.progress=false",
         "train.tensorboard=false", "eval.knn_every=0", "train.log_every=10", "train.checkpoint_every=0",
         "train.batch_size=48"]
MAE = [f"method.crop_size={SIZE}", "method.decoder_dim=128", "method.decoder_depth=2", "method.decoder_heads=4",
       "optim.lr=1.5e-3", "optim.lr_batch_reference=null", "optim.warmup_epochs=2"]
WSP = [f"method.crop_size={SIZE}", "method.crop_scale=[0.35,1.0]", "optim.lr=1e-3", "optim.lr_batch_reference=null",
       "optim.warmup_epochs=2", "optim.weight_decay=0.1"]
LIT = [f"method.crop_size={SIZE}", "method.embed_dim=128", "method.text_size=null", "method.text_depth=2",
       "method.text_width=128", "method.text_heads=4", "method.context_length=64", "method.tokenizer=byte",
       "method.vocab_size=259", "method.cache_features=true", "optim.lr=1e-3", "optim.warmup_epochs=2"]


def run(argv: list[str], log) -> str:
    """Run a wildssl command; its stdout, the command and its wall time go to the log."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "wildssl.cli", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write(json.dumps({"argv": argv, "seconds": round(seconds, 1), "rc": result.returncode}) + "\n")
    log.flush()
    if result.returncode:
        raise SystemExit(f"failed: wildssl {' '.join(argv)}\n{result.stderr[-3000:]}")
    return result.stdout


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def write_data(shared: Path, out: Path, cifar_train: int, cifar_test: int) -> dict[str, str]:
    """The training manifest (COCO + Flickr photos with captions), COCO main-object manifests, CIFAR folders."""
    out.mkdir(parents=True, exist_ok=True)
    train_lines, coco = [], {"train2017": [], "val2017": []}
    # integer classes (the sorted 80 category names): both COCO splits then share one class list
    names = sorted(c["name"] for c in json.loads((shared / "coco_mini" / "categories.json").read_text()))
    for name in ("coco_mini", "flickr8k_mini"):
        for line in (shared / name / "annotations.jsonl").read_text().splitlines():
            entry = json.loads(line)
            path = str(shared / name / entry["file"])
            train_lines.append(json.dumps({"path": path, "captions": entry["captions"]}))
            if name == "coco_mini" and entry.get("objects"):
                largest = max(entry["objects"], key=lambda o: o["area_orig"])
                coco[entry["coco_split"]].append(json.dumps({"path": path,
                                                             "label": names.index(largest["category"])}))
    specs = {"train": out / "photos.jsonl"}
    specs["train"].write_text("\n".join(train_lines) + "\n")
    for split, lines in coco.items():
        specs[f"coco_{split}"] = out / f"coco_{split}.jsonl"
        specs[f"coco_{split}"].write_text("\n".join(lines) + "\n")
    data = np.load(shared / "cifar10_carry.npz")
    classes = data["classes"]
    for split, count in (("train", cifar_train), ("test", cifar_test)):
        images, labels = data[f"x_{split}"][:count], data[f"y_{split}"][:count]  # read each array once
        for index in range(count):
            folder = out / "cifar" / split / str(classes[labels[index]])
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{index:05d}.png"
            if not path.exists():
                Image.fromarray(images[index]).save(path)
        specs[f"cifar_{split}"] = out / "cifar" / split
    specs["coco_zeroshot"] = shared / "coco_mini" / "annotations.jsonl"
    return {key: str(value) for key, value in specs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", required=True, help="the shared/data folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--labels", type=int, default=256, help="vocabulary size")
    parser.add_argument("--mae-steps", type=int, default=250)
    parser.add_argument("--wsp-steps", type=int, default=200)
    parser.add_argument("--lit-steps", type=int, default=150)
    parser.add_argument("--cifar-train", type=int, default=1000)
    parser.add_argument("--cifar-test", type=int, default=500)
    args = parser.parse_args()
    shared, out = Path(args.shared).resolve(), Path(args.out).resolve()
    start = time.perf_counter()
    specs = write_data(shared, out / "data", args.cifar_train, args.cifar_test)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    with open(out / "commands.jsonl", "a") as log:
        vocabulary = out / "vocabulary.txt"
        results["vocabulary"] = run(["vocab", "build", str(shared / "coco_mini" / "captions_val2017_all.jsonl.gz"),
                                     str(shared / "flickr8k_mini" / "captions_flickr8k_all.jsonl.gz"),
                                     "--size", str(args.labels), "--out", str(vocabulary)], log).strip()
        data = [f"data.train={specs['train']}"]
        run(["train", "mae_quick", "--out", str(out / "mae"), "--set", f"train.steps={args.mae_steps}",
             *sum([["--set", s] for s in MODEL + MAE + data], [])], log)
        wsp = MODEL + WSP + data + [f"method.vocabulary={vocabulary}", f"train.steps={args.wsp_steps}"]
        run(["train", "wsp_quick", "--out", str(out / "wsp"), *sum([["--set", s] for s in wsp], [])], log)
        run(["train", "wsp_quick", "--out", str(out / "mae_wsp"),
             *sum([["--set", s] for s in wsp + [f"model.init_from={out / 'mae'}"]], [])], log)
        encoders = {"random init": out / "wsp", "MAE": out / "mae", "WSP": out / "wsp", "MAE -> WSP": out / "mae_wsp"}
        for name in ("wsp", "mae_wsp"):
            lit = MODEL + LIT + data + [f"model.init_from={out / name}", f"train.steps={args.lit_steps}"]
            run(["train", "lit_quick", "--out", str(out / f"lit_{name}"), *sum([["--set", s] for s in lit], [])], log)
            figures = last_json(run(["eval", "zeroshot", str(out / f"lit_{name}"), "--data", specs["coco_zeroshot"],
                                     "--image-size", str(SIZE), "--json"], log))
            results[f"zeroshot {name}"] = figures
            print(json.dumps({f"zeroshot {name}": figures}), flush=True)
        for name, run_dir in encoders.items():
            extra = ["--random-init"] if name == "random init" else []
            for task, (train_spec, test_spec) in {"coco": (specs["coco_train2017"], specs["coco_val2017"]),
                                                  "cifar": (specs["cifar_train"], specs["cifar_test"])}.items():
                knn = last_json(run(["eval", "knn", "--checkpoint", str(run_dir), "--train", train_spec, "--test",
                                     test_spec, "--image-size", str(SIZE), "--pool", "cls", "--json", *extra], log))
                linear = last_json(run(["eval", "linear", str(run_dir), "--train", train_spec, "--test", test_spec,
                                        "--image-size", str(SIZE), "--no-cache", "--json", *extra], log))
                results[f"{name} {task}"] = {"knn_top1": knn["knn_top1"],
                                             "linear": {k: linear[k] for k in ("top1", "top5", "pool", "lr")}}
                print(json.dumps({f"{name} {task}": results[f"{name} {task}"]}), flush=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({"seconds": results["seconds"]}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
