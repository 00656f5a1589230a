"""Attentive probe: multi-head attention pooling (MAP) over frozen patch tokens, then a linear classifier.

The MAP head of Zhai et al. 2022 (big_vision's ``MAPHead``), the attentive probe of seed 000's tables:
one learned query attends to the patch tokens ``(B, P, D)`` (the encoder's final-norm outputs); the
pooled vector goes through a residual MLP and a linear classifier:

    x = MHA(q, tokens) ; x = x + MLP(LN(x)) ; logits = W x + b

Unlike a linear probe on the cls token or the mean token, it can pick tokens by their content, so it
reads information that pooling averages away (where an object is, which patch holds what).
Learning rate chosen on a held-out part of the train split (:mod:`wildssl.eval.probe`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.errors import ConfigError
from wildssl.eval.features import FeatureSet
from wildssl.eval.probe import (ProbeContext, align_classes, class_count, confusion_matrix, fit, predict,
                                require_labels, resolve_options, seeded, select_on_held_out, topk_accuracy)
from wildssl.models.attention import CrossAttention
from wildssl.models.vit import Mlp

OPTIONS: dict[str, Any] = {
    "train": None,  # data SPEC of the labelled train split
    "test": None,  # data SPEC of the labelled test split
    "lrs": [3e-4, 1e-3, 3e-3],  # AdamW learning rates of the sweep
    "epochs": 30,
    "batch_size": 256,
    "weight_decay": 0.01,
    "heads": None,  # attention heads of the pooling; null: the encoder's own number of heads
    "val_fraction": 0.2,
}


class AttentivePooling(nn.Module):
    """MAP head + classifier: tokens ``(B, P, D)`` -> logits ``(B, C)``."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attentive probe: {num_heads} heads do not divide the token width {dim}; "
                              "set heads to a divisor of it")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attention = CrossAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.head = nn.Linear(dim, num_classes)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, P, D) -> (B, D)``: the query's attention read-out after the residual MLP."""
        x = self.attention(self.query.expand(tokens.shape[0], -1, -1), tokens)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(tokens))


def attentive_probe(train: FeatureSet, test: FeatureSet, *, heads: int, lrs=(3e-4, 1e-3, 3e-3), epochs: int = 30,
                    batch_size: int = 256, weight_decay: float = 0.01, val_fraction: float = 0.2, seed: int = 0,
                    progress: bool = False) -> dict:
    """Train and score the MAP probe on the patch tokens of two feature sets: ``top1``, ``top5``, the
    chosen ``lr``, ``grid`` (held-out top-1 per lr), ``loss_curve`` and ``confusion``."""
    train_tokens, test_tokens = train.require_patch("attentive"), test.require_patch("attentive")
    train, test = align_classes(train, test, "attentive probe")
    train_labels = require_labels(train, "attentive", "train")
    test_labels = require_labels(test, "attentive", "test")
    num_classes = max(class_count(train.classes, train_labels), class_count(test.classes, test_labels))
    dim = train_tokens.shape[-1]

    def train_model(tokens: torch.Tensor, labels: torch.Tensor, lr: float, description: str):
        with seeded(seed):
            model = AttentivePooling(dim, num_classes, heads)
        curve = fit(model, len(tokens), lambda i: F.cross_entropy(model(tokens[i].float()), labels[i]), lr=lr,
                    epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                    description=description, progress=progress)
        return model, curve

    def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return predict(model, len(tokens), lambda i: model(tokens[i].float()))

    def train_and_score(setting: dict, fit_indices: torch.Tensor, val_indices: torch.Tensor) -> float:
        model, _ = train_model(train_tokens[fit_indices], train_labels[fit_indices], setting["lr"],
                               f"attentive lr={setting['lr']:g}")
        return topk_accuracy(logits_of(model, train_tokens[val_indices]), train_labels[val_indices], (1,))["top1"]

    selection = select_on_held_out([{"lr": float(lr)} for lr in lrs], len(train), val_fraction, seed, train_and_score)
    lr = selection.best["lr"]
    model, curve = train_model(train_tokens, train_labels, lr, f"attentive final lr={lr:g}")
    logits = logits_of(model, test_tokens)
    return {**topk_accuracy(logits, test_labels, learned=train_labels), "lr": lr, "grid": selection.scores,
            "loss_curve": curve,
            "confusion": confusion_matrix(logits.argmax(1), test_labels, num_classes).tolist(),
            "classes": train.classes, "num_train": len(train), "num_test": len(test)}


def run(context: ProbeContext, options: dict | None = None) -> dict:
    """The suite's ``attentive`` entry: options of :data:`OPTIONS`."""
    options = resolve_options("attentive", OPTIONS, options, required=("train", "test"))
    train = context.features(options["train"], options, with_patch=True)
    test = context.features(options["test"], options, with_patch=True)
    heads = options["heads"] or getattr(context.store.encoder, "num_heads", 1)
    return attentive_probe(train, test, heads=heads, lrs=options["lrs"], epochs=options["epochs"],
                           batch_size=options["batch_size"], weight_decay=options["weight_decay"],
                           val_fraction=options["val_fraction"], seed=context.seed, progress=context.progress)
