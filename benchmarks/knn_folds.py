"""Cross-validated k-NN of trained runs and of their random initialization, for small labelled sets.

    python benchmarks/knn_folds.py --data TRAIN --val TEST [--folds 5] RUN_DIR [RUN_DIR ...]

A k-NN test of 156 photos (Flickr8k's labelled dev + test) measures a top-1 near 40% with a binomial
standard error of about 3.9 points, so a +5 gain is barely above the noise, and random-init floors of two
seeds differ by 7 points on it (``benchmarks/demo.md``, seventh round). This re-measures a run on every
labelled image of ``--data`` and ``--val`` together: the images are split into ``--folds`` folds (fixed
order, seed 0) and each fold is classified with the others as the k-NN memory (k=20, T=0.07, the DINO
protocol of the online k-NN). Every labelled image is a test image once, so the figure rests on all of them.

For each run it measures the network the run's own k-NN measured (``load_encoder``'s default: DINO's
teacher, SimCLR's student), with the run's pooling (``eval.pool``), and the same network at its random
initialization: the method is rebuilt from the run's config under the run's seed, as the engine builds it
before step 0. The ``--data`` images were seen (unlabelled) in training; the labels were not. ``--data`` and
``--val`` may also be a labelled set the run never saw: a transfer k-NN, which is how the CLIP-family recipes,
trained on captioned photos, are measured on CIFAR-10 and the CamVid objects (``benchmarks/demo.md``, fourteenth
round). One JSON line per run on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from wildssl.data import open_source
from wildssl.eval.evaluate import _loader, dense_labels
from wildssl.eval.features import extract_features
from wildssl.errors import WildsslError
from wildssl.eval.knn import folded_knn_accuracy
from wildssl.methods import build_initial_method
from wildssl.models.loading import CHECKPOINT_NAME, load_encoder


def labelled_features(encoder, specs: list[str], image_size: int, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """l2-normalized features and labels of the labelled images of every spec (labels < 0 dropped)."""
    features, labels = [], []
    for spec in specs:
        f, y = extract_features(encoder.eval(), _loader(open_source(spec, image_size), 256, 0), "cpu", image_size,
                                pool)
        keep = y >= 0
        features.append(f[keep])
        labels.append(y[keep])
    return torch.cat(features), torch.cat(labels)


def measure(run_dir: Path, specs: list[str], folds: int) -> dict:
    if not (run_dir / "config.yaml").is_file():
        raise WildsslError(f"{run_dir} is not a run directory: it has no config.yaml "
                           "(give the --out folder of a wildssl train run)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    pool, image_size = config["eval"]["pool"], config["model"]["img_size"]
    initial = build_initial_method(config).encoder()  # the run's initial weights, as the engine built them
    trained = load_encoder(run_dir / CHECKPOINT_NAME)
    result = {"run": str(run_dir), "pool": pool, "folds": folds}
    for name, encoder in (("trained", trained), ("random_init", initial)):
        features, labels = labelled_features(encoder, specs, image_size, pool)  # extract_features: no grad
        dense, _, num_classes = dense_labels(labels, labels[:0])  # one set: no test labels beside it
        result[f"knn_top1_{name}"] = folded_knn_accuracy(features, dense, num_classes, folds)["top1"]
    n = len(labels)
    p = result["knn_top1_random_init"]
    result.update(images=n, gain=result["knn_top1_trained"] - p, standard_error=math.sqrt(p * (1 - p) / n))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (config.yaml + checkpoint)")
    parser.add_argument("--data", required=True, help="the training images (labelled ones are used)")
    parser.add_argument("--val", required=True, help="the held-out images")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds {args.folds}: give 2 or more (each fold is classified against the others)")
    for run in args.runs:
        try:
            result = measure(run, [args.data, args.val], args.folds)
        except WildsslError as error:  # a bad run, config or data: one line, as the wildssl commands do
            print(f"knn_folds: error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
