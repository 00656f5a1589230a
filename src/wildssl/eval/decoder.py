"""Decoder probe: a small transformer decoder over frozen tokens, trained on several tasks at once.

After Beyer et al. 2023 ("A Study of Autoregressive Decoders for Multi-Tasking in Computer Vision"),
reduced to what seed 000 measures: queries cross-attend to the frozen patch tokens, one query per task
instance, no autoregression. Tasks, each trained when the train split has its annotations:

- **image classification**: one learned query per image; a single label (cross-entropy, top-1/top-5)
  or, when images carry several labels (COCO), a multi-label target (binary cross-entropy; scored by
  precision@1, the fraction of images whose best class is one of theirs);
- **box-conditioned object classification**: one query per box, made from the box's coordinates; the
  decoder names the object in the box (cross-entropy, top-1 over the test boxes).

Positions: the frozen tokens get the Fourier features of their patch's box added (a learned linear map
of them), and a box query is the same kind of map of its box. A box query attends only to the patches
its box overlaps: a region prior, as RoI pooling gives detectors, so that the few hundred boxes of a
small set suffice to train it (without it the decoder must first learn to match box and patch codes);
within the box, the position codes still tell it where each patch lies. Queries do not attend to each
other: every box is classified from the image alone. Per block: ``x = x + CrossAttn(LN(x), memory)``,
``x = x + MLP(LN(x))``. Learning rate chosen on a held-out part
of the train split by the mean of the task scores (:mod:`wildssl.eval.probe`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.errors import DataError
from wildssl.eval.features import FeatureSet
from wildssl.eval.probe import (ProbeContext, align_classes, class_count, fit, resolve_options, seeded,
                                select_on_held_out)
from wildssl.models.attention import CrossAttention
from wildssl.models.vit import Mlp

OPTIONS: dict[str, Any] = {
    "train": None,  # data SPEC of the train split (labels and/or boxes with labels)
    "test": None,  # data SPEC of the test split
    "lrs": [3e-4, 1e-3, 3e-3],  # AdamW learning rates of the sweep
    "epochs": 30,
    "batch_size": 128,
    "weight_decay": 0.01,
    "width": 128,  # decoder width (the frozen tokens are projected to it)
    "depth": 2,  # decoder blocks
    "heads": 4,
    "val_fraction": 0.2,
}

FOURIER_FREQUENCIES = 6  # sin/cos of 2^k * pi * coordinate, k < 6: the finest period is 1/32 of the image side


def box_fourier_features(boxes: torch.Tensor, frequencies: int = FOURIER_FREQUENCIES) -> torch.Tensor:
    """Normalized boxes ``(..., 4)`` -> ``(..., 8 * frequencies)``: sin and cos of ``2^k pi c`` per coordinate."""
    scales = math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32, device=boxes.device)
    angles = boxes.float()[..., None] * scales  # (..., 4, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def patch_boxes(grid: tuple[int, int]) -> torch.Tensor:
    """The normalized box ``(x0, y0, x1, y1)`` of every cell of a ``(h, w)`` patch grid: ``(h * w, 4)``, row-major."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([cols / w, rows / h, (cols + 1) / w, (rows + 1) / h], dim=-1).reshape(h * w, 4)


class DecoderBlock(nn.Module):
    """Pre-norm cross-attention block: queries ``(B, L, W)`` read a memory ``(B, P, W)``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.cross = CrossAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.cross(self.norm1(x), memory, attn_mask)
        return x + self.mlp(self.norm2(x))


class DecoderProbe(nn.Module):
    """Tokens ``(B, P, D)`` on ``grid`` + boxes ``(B, L, 4)`` -> image logits ``(B, C_img)`` and box
    logits ``(B, L, C_box)`` (either None when its task is off: ``image_classes`` / ``box_classes`` 0)."""

    def __init__(self, token_dim: int, grid: tuple[int, int], width: int, depth: int, heads: int,
                 image_classes: int, box_classes: int) -> None:
        super().__init__()
        fourier = 8 * FOURIER_FREQUENCIES
        self.register_buffer("patch_boxes", patch_boxes(grid), persistent=False)
        self.register_buffer("patch_positions", box_fourier_features(self.patch_boxes), persistent=False)
        self.memory_in = nn.Linear(token_dim, width)
        self.memory_position = nn.Linear(fourier, width)
        self.image_query = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.image_query, std=0.02)
        self.box_query = nn.Linear(fourier, width)
        self.blocks = nn.ModuleList(DecoderBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.image_head = nn.Linear(width, image_classes) if image_classes else None
        self.box_head = nn.Linear(width, box_classes) if box_classes else None

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        memory = self.memory_in(tokens.float()) + self.memory_position(self.patch_positions)
        queries = [self.image_query.expand(tokens.shape[0], -1, -1)]
        mask = None
        if boxes is not None and self.box_head is not None:
            queries.append(self.box_query(box_fourier_features(boxes)))
            mask = self.attention_mask(boxes)
        x = torch.cat(queries, dim=1)
        for block in self.blocks:
            x = block(x, memory, mask)
        x = self.norm(x)
        image = self.image_head(x[:, 0]) if self.image_head is not None else None
        box = self.box_head(x[:, 1:]) if self.box_head is not None and boxes is not None else None
        return image, box

    def attention_mask(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 1 + L, P)`` bool: the image query sees every patch, a box query the patches its box
        overlaps (padding boxes, all zero, see the first patch so that no row is empty)."""
        cells = self.patch_boxes
        overlap_w = torch.minimum(boxes[..., None, 2], cells[:, 2]) - torch.maximum(boxes[..., None, 0], cells[:, 0])
        overlap_h = torch.minimum(boxes[..., None, 3], cells[:, 3]) - torch.maximum(boxes[..., None, 1], cells[:, 1])
        inside = (overlap_w > 0) & (overlap_h > 0)  # (B, L, P)
        inside[..., 0] |= ~inside.any(dim=-1)
        everything = torch.ones_like(inside[:, :1])
        return torch.cat([everything, inside], dim=1)[:, None]


def padded_boxes(features: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(N, L, 4)`` and their labels ``(N, L)`` padded to the most boxes of an image (label -1:
    padding or an unlabelled box, left out of loss and score). ``L`` is at least 1."""
    most = max([len(b) for b in features.boxes] + [1])
    boxes = torch.zeros(len(features), most, 4)
    labels = torch.full((len(features), most), -1, dtype=torch.long)
    for i, (image_boxes, image_labels) in enumerate(zip(features.boxes, features.box_labels)):
        boxes[i, :len(image_boxes)] = image_boxes
        labels[i, :len(image_labels)] = image_labels
    return boxes, labels


def image_task(train: FeatureSet) -> str | None:
    """``"single"`` when every train image has a class label, ``"multi"`` when some have multi-labels
    (and not every one a single label), None when there are no image labels."""
    if len(train.labels) and bool((train.labels >= 0).all()):
        return "single"
    if any(train.multi_labels):
        return "multi"
    return None


def multi_hot(multi_labels: list[list[int]], num_classes: int) -> torch.Tensor:
    target = torch.zeros(len(multi_labels), num_classes)
    for i, labels in enumerate(multi_labels):
        target[i, labels] = 1.0
    return target


def decoder_probe(train: FeatureSet, test: FeatureSet, *, lrs=(3e-4, 1e-3, 3e-3), epochs: int = 30,
                  batch_size: int = 128, weight_decay: float = 0.01, width: int = 128, depth: int = 2,
                  heads: int = 4, val_fraction: float = 0.2, seed: int = 0, progress: bool = False) -> dict:
    """Train and score the decoder probe on every task the train split has annotations for.

    Returns ``tasks``, the scores (``image_top1``/``image_top5`` or ``image_precision_at_1``;
    ``box_top1``/``box_top5`` and ``box_majority_baseline``, the test share of the most common train box
    class), the chosen ``lr``, ``grid``, ``loss_curve`` and the counts."""
    train_tokens, test_tokens = train.require_patch("decoder"), test.require_patch("decoder")
    train, test = align_classes(train, test, "decoder probe")
    task = image_task(train)
    train_boxes, train_box_labels = padded_boxes(train)
    test_boxes, test_box_labels = padded_boxes(test)
    has_boxes = bool((train_box_labels >= 0).any())
    if task is None and not has_boxes:
        raise DataError("the decoder probe found nothing to learn in its train split: no image labels, no "
                        "multi-labels and no labelled boxes (COCO-style 'objects' or 'boxes' + 'box_labels')")
    all_multi = [torch.tensor(v, dtype=torch.long) for v in train.multi_labels + test.multi_labels]
    if task == "single":
        image_classes = max(class_count(train.classes, train.labels), class_count(test.classes, test.labels))
    elif task == "multi":
        image_classes = class_count(train.classes, *all_multi)
    else:
        image_classes = 0
    box_classes = class_count(train.classes, train_box_labels, test_box_labels) if has_boxes else 0
    train_targets = image_targets(train, task, image_classes)
    test_targets = image_targets(test, task, image_classes)

    def train_model(indices: torch.Tensor, lr: float, description: str):
        with seeded(seed):
            model = DecoderProbe(train_tokens.shape[-1], train.grid, width, depth, heads, image_classes, box_classes)

        def batch_loss(batch: torch.Tensor) -> torch.Tensor:
            rows = indices[batch]
            image_logits, box_logits = model(train_tokens[rows], train_boxes[rows] if has_boxes else None)
            return task_loss(task, image_logits, train_targets[rows] if task else None, box_logits,
                             train_box_labels[rows])

        curve = fit(model, len(indices), batch_loss, lr=lr, epochs=epochs, batch_size=batch_size,
                    weight_decay=weight_decay, seed=seed, description=description, progress=progress)
        return model, curve

    def scores_of(model: nn.Module, tokens, boxes, box_labels, targets, rows: torch.Tensor) -> dict[str, float]:
        image_logits, box_logits = decode(model, tokens, boxes if has_boxes else None, rows)
        result = {}
        if task is not None:
            result.update(image_scores(task, image_logits, targets[rows]))
        if has_boxes:
            labels = box_labels[rows].flatten()
            valid = labels >= 0
            result.update(box_scores(box_logits.flatten(0, 1)[valid], labels[valid]))
        return result

    def selection_score(scores: dict[str, float]) -> float:
        keys = [k for k in ("image_top1", "image_precision_at_1", "box_top1") if k in scores]
        return sum(scores[k] for k in keys) / len(keys)

    def train_and_score(setting: dict, fit_indices: torch.Tensor, val_indices: torch.Tensor) -> float:
        model, _ = train_model(fit_indices, setting["lr"], f"decoder lr={setting['lr']:g}")
        return selection_score(scores_of(model, train_tokens, train_boxes, train_box_labels, train_targets,
                                         val_indices))

    selection = select_on_held_out([{"lr": float(lr)} for lr in lrs], len(train), val_fraction, seed, train_and_score)
    lr = selection.best["lr"]
    model, curve = train_model(torch.arange(len(train)), lr, f"decoder final lr={lr:g}")
    result = scores_of(model, test_tokens, test_boxes, test_box_labels, test_targets, torch.arange(len(test)))
    tasks = ([f"image ({task}-label)"] if task else []) + (["box"] if has_boxes else [])
    if has_boxes:
        train_valid = train_box_labels[train_box_labels >= 0]
        test_valid = test_box_labels[test_box_labels >= 0]
        majority = int(torch.bincount(train_valid).argmax())
        result["box_majority_baseline"] = (test_valid == majority).float().mean().item() if len(test_valid) else 0.0
        result["num_test_boxes"] = int(len(test_valid))
    return {**result, "tasks": tasks, "lr": lr, "grid": selection.scores, "loss_curve": curve,
            "num_train": len(train), "num_test": len(test)}


@torch.no_grad()
def decode(model: DecoderProbe, tokens: torch.Tensor, boxes: torch.Tensor | None, rows: torch.Tensor,
           batch_size: int = 256) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Image logits ``(n, C_img)`` and box logits ``(n, L, C_box)`` of the images ``rows`` (eval mode)."""
    model.eval()
    images, boxes_out = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        image_logits, box_logits = model(tokens[batch], None if boxes is None else boxes[batch])
        images.append(image_logits)
        boxes_out.append(box_logits)
    return (None if images[0] is None else torch.cat(images)), (None if boxes_out[0] is None else torch.cat(boxes_out))


def image_targets(features: FeatureSet, task: str | None, num_classes: int) -> torch.Tensor:
    """Per-image targets: labels ``(N,)`` (single), multi-hot ``(N, C)`` (multi), or an empty ``(N, 0)``."""
    if task == "single":
        if (features.labels < 0).any():
            raise DataError("the decoder probe's image task needs a label for every test image, as in training")
        return features.labels
    if task == "multi":
        return multi_hot(features.multi_labels, num_classes)
    return torch.zeros(len(features), 0)


def task_loss(task: str | None, image_logits, image_targets, box_logits, box_labels: torch.Tensor) -> torch.Tensor:
    """Sum of the task losses of a batch: image cross-entropy (single) or binary cross-entropy over the
    images that have labels (multi), plus the mean cross-entropy over the labelled boxes."""
    loss = torch.zeros(())
    if task == "single":
        loss = loss + F.cross_entropy(image_logits, image_targets)
    elif task == "multi":
        labelled = image_targets.sum(dim=1) > 0
        if labelled.any():
            loss = loss + F.binary_cross_entropy_with_logits(image_logits[labelled], image_targets[labelled])
    if box_logits is not None:
        valid = box_labels >= 0
        if valid.any():
            loss = loss + F.cross_entropy(box_logits[valid], box_labels[valid])
    return loss


def image_scores(task: str, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    if task == "single":
        scores = {"image_top1": (logits.argmax(1) == targets).float().mean().item()}
        if logits.shape[1] > 5:
            scores["image_top5"] = (logits.topk(5, dim=1).indices == targets[:, None]).any(1).float().mean().item()
        return scores
    labelled = targets.sum(dim=1) > 0
    best = logits[labelled].argmax(dim=1)
    hits = targets[labelled].gather(1, best[:, None])[:, 0]
    return {"image_precision_at_1": hits.mean().item() if len(hits) else 0.0}


def box_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    if len(labels) == 0:
        return {"box_top1": 0.0}
    scores = {"box_top1": (logits.argmax(1) == labels).float().mean().item()}
    if logits.shape[1] > 5:
        scores["box_top5"] = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    return scores


def run(context: ProbeContext, options: dict | None = None) -> dict:
    """The suite's ``decoder`` entry: options of :data:`OPTIONS`."""
    options = resolve_options("decoder", OPTIONS, options, required=("train", "test"))
    train = context.features(options["train"], options, with_patch=True)
    test = context.features(options["test"], options, with_patch=True)
    return decoder_probe(train, test, lrs=options["lrs"], epochs=options["epochs"], batch_size=options["batch_size"],
                         weight_decay=options["weight_decay"], width=options["width"], depth=options["depth"],
                         heads=options["heads"], val_fraction=options["val_fraction"], seed=context.seed,
                         progress=context.progress)
