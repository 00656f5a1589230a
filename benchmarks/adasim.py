"""DINO-2 vs DINO-2+NN vs DINO-2+AdaSim, and SimSiam vs SimSiam+AdaSim, at equal epochs on CIFAR-10 images.

Each pair method runs its ``*_quick`` recipe; its base runs the same recipe with the pairing keys removed
(``dino`` / ``simsiam``, same model, crops, optimizer, steps and seed), so the runs differ only in where
the second view comes from. All runs train on the first ``--train-images`` images of the CIFAR-10 carry
file (class-balanced), with the online k-NN every epoch (memory: those training images; test: the first
``--knn-test-images`` test images), and end with the k-NN of the trained encoder and of the same
architecture at its initialization on the full carry file (memory 10,000 train, test 3,000), both on the
feature the run's own k-NN reads (its ``eval.pool``).

    python benchmarks/adasim.py --cifar .carry/cifar10_carry.npz --out runs/adasim_cmp          # CPU, ~30 min CPU
    python benchmarks/adasim.py --cifar .carry/cifar10_carry.npz --out $OUT/cmp --set model.name=small \\
        --set model.patch_size=4 --set train.steps=3000 --set data.num_workers=8                  # GPU, owed

Writes ``results.json`` (per run: k-NN, random init, per-epoch k-NN and neighbour ratio, alarms, wall and
CPU seconds, load average) and ``adasim.png`` (k-NN per epoch, neighbour ratio, spread of the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# (run name, recipe, pairing keys removed -> base method name or None)
RUNS = (("dino2", "adasim_dino_quick", "dino"), ("dino2_nn", "nn_dino_quick", None),
        ("dino2_adasim", "adasim_dino_quick", None), ("simsiam", "adasim_simsiam_quick", "simsiam"),
        ("simsiam_adasim", "adasim_simsiam_quick", None))
PAIR_PREFIXES = ("adasim_", "neighbour_", "oracle_")


def write_folder(images: np.ndarray, labels: np.ndarray, classes: np.ndarray, out: Path) -> str:
    """Images as class-folder PNGs (an image-folder source with labels); reused when already written."""
    done = out / ".complete"
    if not done.exists():
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = out / str(classes[label])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:05d}.png")
        done.write_text(str(len(images)))
    return str(out)


def cifar_folders(npz: Path, out: Path, train_images: int, test_images: int) -> dict[str, str]:
    data = np.load(npz)
    x_train, y_train, x_test, y_test, classes = (data[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes"))
    return {"train": write_folder(x_train[:train_images], y_train[:train_images], classes, out / f"train{train_images}"),
            "memory": write_folder(x_train, y_train, classes, out / "memory"),
            "test": write_folder(x_test, y_test, classes, out / "test"),
            "knn_test": write_folder(x_test[:test_images], y_test[:test_images], classes, out / f"test{test_images}")}


def base_recipe(recipe: str, method: str, out: Path) -> str:
    """The recipe with its pairing keys removed and ``method.name`` set to the base: a YAML file."""
    sys.path.insert(0, str(ROOT / "src"))
    from wildssl.train.config import read_recipe

    tree, _ = read_recipe(recipe)
    tree["method"] = {k: v for k, v in tree["method"].items() if not k.startswith(PAIR_PREFIXES)}
    tree["method"]["name"] = method
    path = out / f"{method}_base.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def wildssl(*argv: str) -> str:
    result = subprocess.run([sys.executable, "-m", "wildssl.cli", *argv], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"wildssl {' '.join(argv[:3])} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def per_epoch(run_dir: Path) -> dict[str, list]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out: dict[str, list] = {}
    for key in ("knn_top1", "neighbour_ratio", "nn_top1_accuracy", "cache_embedding_std", "embedding_std"):
        out[key] = [(r["step"], r[key]) for r in records if key in r]
    return out


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4))
    for record in results:
        style = "-" if record["run"].startswith("dino") else "--"
        for axis, key in zip(axes, ("knn_top1", "neighbour_ratio", "cache_embedding_std")):
            points = record["curves"].get(key) or []
            if points:
                epochs = [step / record["steps_per_epoch"] for step, _ in points]
                axis.plot(epochs, [v for _, v in points], style, label=record["run"], marker=".")
    titles = ("online k-NN top-1 (memory: training images)", "neighbour ratio (pairs across images)",
              "cache embedding std (x sqrt(d); collapse: near 0)")
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", required=True, help="cifar10_carry.npz")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-images", type=int, default=5000,
                        help="training images (the first ones of the carry file; 5,000 as benchmarks/quick_recipes.py)")
    parser.add_argument("--knn-test-images", type=int, default=1000)
    parser.add_argument("--only", action="append", choices=[name for name, _, _ in RUNS])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = cifar_folders(Path(args.cifar), out / "data", args.train_images, args.knn_test_images)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {r["run"] for r in results}
    for name, recipe, base in RUNS:
        if (args.only and name not in args.only) or name in done:
            continue
        run_dir = out / name
        recipe_arg = base_recipe(recipe, base, out) if base else recipe
        sys.path.insert(0, str(ROOT / "src"))
        from wildssl.train.config import build_config

        config = build_config(recipe_arg, [f"data.train={folders['train']}"] + args.set)
        steps_per_epoch = args.train_images // config["train"]["batch_size"]
        argv = ["train", recipe_arg, "--data", folders["train"], "--out", str(run_dir),
                "--set", f"eval.knn_train={folders['train']}", "--set", f"eval.knn_test={folders['knn_test']}",
                "--set", f"eval.knn_every={steps_per_epoch}", "--set", "train.progress=false",
                "--set", "train.tensorboard=false", "--set", "train.checkpoint_every=0"]
        for item in args.set:
            argv += ["--set", item]
        load_before, cpu_before, wall_before = os.getloadavg()[0], children_cpu_seconds(), time.time()
        summary = json.loads(wildssl(*argv))
        wall, cpu = time.time() - wall_before, children_cpu_seconds() - cpu_before
        load_after = os.getloadavg()[0]
        knn = json.loads(wildssl("eval", "knn", "--checkpoint", str(run_dir), "--train", folders["memory"],
                                 "--test", folders["test"], "--json"))
        random = json.loads(wildssl("eval", "knn", "--checkpoint", str(run_dir), "--random-init", "--train",
                                    folders["memory"], "--test", folders["test"], "--json"))
        record = {"run": name, "recipe": recipe, "method": config["method"]["name"], "steps": summary["steps"],
                  "steps_per_epoch": steps_per_epoch, "epochs": summary["steps"] / steps_per_epoch,
                  "knn_top1": knn["knn_top1"], "knn_top1_random_init": random["knn_top1"],
                  "gain_points": round(100 * (knn["knn_top1"] - random["knn_top1"]), 2), "pool": knn["pool"],
                  "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
                  "load_average": [round(load_before, 2), round(load_after, 2)], "alarms": summary["alarms"],
                  "curves": per_epoch(run_dir)}
        print(json.dumps({k: v for k, v in record.items() if k != "curves"}), flush=True)
        results.append(record)
        results_path.write_text(json.dumps(results, indent=1))
    plot(results, out / "adasim.png")


if __name__ == "__main__":
    main()
