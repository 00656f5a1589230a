"""Linear probe on frozen features (MAE, He et al. 2022, Sec. A.2; seed 004's protocol).

A BatchNorm without affine parameters standardizes the frozen feature, then one linear layer
classifies it: ``logits = W BN(f) + b``, ``f`` ``(B, D)`` the cls token or the mean patch token. The
BatchNorm makes one learning-rate grid fit encoders whose features have very different scales. cls vs
average pooling and the learning rate are chosen on a held-out part of the train split
(:mod:`wildssl.eval.probe`); top-1 and top-5 are reported on the test split, with the confusion matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.eval.features import FeatureSet
from wildssl.eval.probe import (ProbeContext, align_classes, class_count, confusion_matrix, fit, predict,
                                require_labels, resolve_options, seeded, select_on_held_out, topk_accuracy)
from wildssl.errors import ConfigError
from wildssl.models.loading import POOLS

OPTIONS: dict[str, Any] = {
    "train": None,  # data SPEC of the labelled train split
    "test": None,  # data SPEC of the labelled test split
    "pools": ["cls", "avg"],  # the representations the sweep compares
    "lrs": [1e-3, 3e-3, 1e-2],  # AdamW learning rates of the sweep
    "epochs": 30,
    "batch_size": 256,
    "weight_decay": 0.0,  # MAE's linear probe uses none
    "val_fraction": 0.2,  # the held-out part of the train split that picks pool and lr
}


class LinearClassifier(nn.Module):
    """``BatchNorm1d(affine=False)`` then ``Linear``: ``(B, D) -> (B, C)``. The weight starts at
    trunc-normal std 0.01 and the bias at 0, as MAE's probe head.

    ``norm_momentum=None`` (offline probes) makes the running statistics the plain average over every
    training batch: the features are frozen, so that is the dataset's mean and variance, whatever the
    number of steps; the online probe, whose features drift, uses an exponential average (0.1)."""

    def __init__(self, dim: int, num_classes: int, norm_momentum: float | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=norm_momentum)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features))


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, lr: float, epochs: int,
                 batch_size: int, weight_decay: float, seed: int, progress: bool = False,
                 description: str = "linear probe") -> tuple[LinearClassifier, list[float]]:
    """A :class:`LinearClassifier` trained on ``features`` ``(N, D)`` and ``labels`` ``(N,)``; returns it
    (in eval mode) with its loss per epoch."""
    with seeded(seed):
        model = LinearClassifier(features.shape[1], num_classes)
    curve = fit(model, len(features), lambda i: F.cross_entropy(model(features[i]), labels[i]), lr=lr,
                epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                description=description, progress=progress)
    return model, curve


def linear_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return predict(model, len(features), lambda i: model(features[i]))


def linear_probe(train: FeatureSet, test: FeatureSet, *, pools=("cls", "avg"), lrs=(1e-3, 3e-3, 1e-2),
                 epochs: int = 30, batch_size: int = 256, weight_decay: float = 0.0, val_fraction: float = 0.2,
                 seed: int = 0, progress: bool = False) -> dict:
    """The protocol of the module docstring on two feature sets; accuracies are fractions in [0, 1].

    Returns ``top1``, ``top5`` (with more than 5 classes), the chosen ``pool`` and ``lr``, ``grid``
    (every setting with its held-out top-1 ``val``), ``loss_curve`` of the final fit and ``confusion``."""
    for pool in pools:
        if pool not in POOLS:
            raise ConfigError(f"linear probe pool {pool!r} is unknown; use some of {', '.join(POOLS)}")
    train, test = align_classes(train, test, "linear probe")
    train_labels = require_labels(train, "linear", "train")
    test_labels = require_labels(test, "linear", "test")
    num_classes = max(class_count(train.classes, train_labels), class_count(test.classes, test_labels))

    def train_and_score(setting: dict, fit_indices: torch.Tensor, val_indices: torch.Tensor) -> float:
        features = train.pooled(setting["pool"])
        model, _ = train_linear(features[fit_indices], train_labels[fit_indices], num_classes, lr=setting["lr"],
                                epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                                progress=progress, description=f"linear {setting['pool']} lr={setting['lr']:g}")
        logits = linear_logits(model, features[val_indices])
        return topk_accuracy(logits, train_labels[val_indices], (1,))["top1"]

    settings = [{"pool": pool, "lr": float(lr)} for pool in pools for lr in lrs]
    selection = select_on_held_out(settings, len(train), val_fraction, seed, train_and_score)
    pool, lr = selection.best["pool"], selection.best["lr"]
    model, curve = train_linear(train.pooled(pool), train_labels, num_classes, lr=lr, epochs=epochs,
                                batch_size=batch_size, weight_decay=weight_decay, seed=seed, progress=progress,
                                description=f"linear final {pool} lr={lr:g}")
    logits = linear_logits(model, test.pooled(pool))
    return {**topk_accuracy(logits, test_labels, learned=train_labels), "pool": pool, "lr": lr,
            "grid": selection.scores, "loss_curve": curve,
            "confusion": confusion_matrix(logits.argmax(1), test_labels, num_classes).tolist(),
            "classes": train.classes, "num_train": len(train), "num_test": len(test)}


def run(context: ProbeContext, options: dict | None = None) -> dict:
    """The suite's ``linear`` entry: options of :data:`OPTIONS`."""
    options = resolve_options("linear", OPTIONS, options, required=("train", "test"))
    train = context.features(options["train"], options)
    test = context.features(options["test"], options)
    return linear_probe(train, test, pools=options["pools"], lrs=options["lrs"], epochs=options["epochs"],
                        batch_size=options["batch_size"], weight_decay=options["weight_decay"],
                        val_fraction=options["val_fraction"], seed=context.seed, progress=context.progress)
