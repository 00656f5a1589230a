"""Linear segmentation probe on frozen patch tokens, scored by mIoU (DINOv2's "linear", Oquab et al. 2024).

Each patch token ``(D,)`` goes through a BatchNorm without affine and one linear layer to class logits;
the ``(C, h, w)`` logit grid is upsampled bilinearly to the ground-truth mask ``(H, W)`` and trained
with per-pixel cross-entropy, pixels equal to ``ignore_index`` left out. Scored on the test split by
the mean intersection over union over classes,

    IoU_c = TP_c / (TP_c + FP_c + FN_c),   mIoU = mean of IoU_c over classes present in truth or prediction,

from the confusion matrix of all non-ignored test pixels (and pixel accuracy). Learning rate chosen by
mIoU on a held-out part of the train split (:mod:`wildssl.eval.probe`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.errors import DataError
from wildssl.eval.features import FeatureSet
from wildssl.eval.probe import ProbeContext, fit, resolve_options, seeded, select_on_held_out

OPTIONS: dict[str, Any] = {
    "train": None,  # data SPEC whose images have masks ('mask' in a .jsonl manifest; synthetic:scenes)
    "test": None,
    "ignore_index": 255,  # mask value left out of loss and score (CamVid: 11, "Unlabelled")
    "num_classes": None,  # null: one more than the largest mask value seen (ignore_index aside)
    "lrs": [1e-3, 3e-3, 1e-2],
    "epochs": 20,
    "batch_size": 16,  # images per step: every pixel of their masks enters the loss
    "weight_decay": 0.0,
    "val_fraction": 0.2,
}


class PatchLinear(nn.Module):
    """Per-patch ``BatchNorm(affine=False) + Linear``: tokens ``(B, P, D)`` -> logits ``(B, C, h, w)``."""

    def __init__(self, dim: int, num_classes: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = tuple(grid)
        # momentum None: running statistics average every batch (frozen features; see LinearClassifier)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, patches, dim = tokens.shape
        logits = self.head(self.norm(tokens.float().reshape(batch * patches, dim)))
        return logits.reshape(batch, *self.grid, -1).permute(0, 3, 1, 2)


def upsampled_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, h, w) -> (B, C, H, W)``, bilinear (corners not aligned, as DINOv2's linear head)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _by_shape(masks: list[torch.Tensor], rows: torch.Tensor) -> dict[tuple[int, int], list[int]]:
    """Positions in ``rows`` grouped by the shape of their mask (masks of one shape upsample together)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, row in enumerate(rows.tolist()):
        groups[tuple(masks[row].shape)].append(position)
    return groups


def pixel_loss(model: PatchLinear, tokens: torch.Tensor, masks: list[torch.Tensor], rows: torch.Tensor,
               ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over every non-ignored pixel of the masks of ``rows``."""
    logits = model(tokens[rows])
    total, count = logits.new_zeros(()), 0
    for shape, positions in _by_shape(masks, rows).items():
        target = torch.stack([masks[int(rows[p])] for p in positions])
        total = total + F.cross_entropy(upsampled_logits(logits[positions], shape), target,
                                        ignore_index=ignore_index, reduction="sum")
        count += int((target != ignore_index).sum())
    return total / max(count, 1)


@torch.no_grad()
def segmentation_confusion(model: PatchLinear, tokens: torch.Tensor, masks: list[torch.Tensor], rows: torch.Tensor,
                           num_classes: int, ignore_index: int, batch_size: int = 16) -> torch.Tensor:
    """``(C, C)`` confusion (row = true class) over the non-ignored pixels of the images ``rows``."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        logits = model(tokens[batch])
        for shape, positions in _by_shape(masks, batch).items():
            predicted = upsampled_logits(logits[positions], shape).argmax(dim=1)
            target = torch.stack([masks[int(batch[p])] for p in positions])
            valid = target != ignore_index
            confusion += torch.bincount(target[valid] * num_classes + predicted[valid],
                                        minlength=num_classes * num_classes)
    return confusion.reshape(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> tuple[float, list[float | None]]:
    """mIoU and per-class IoU from a ``(C, C)`` confusion (row = truth); a class absent from both truth
    and prediction has IoU None and is left out of the mean."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=1) + confusion.sum(dim=0) - true_positive
    per_class = [None if u == 0 else (tp / u).item() for tp, u in zip(true_positive, union)]
    present = [v for v in per_class if v is not None]
    return (sum(present) / len(present) if present else 0.0), per_class


def mask_classes(masks: list[torch.Tensor], ignore_index: int) -> int:
    """One more than the largest mask value other than ``ignore_index``."""
    largest = max(int(m[m != ignore_index].max()) if (m != ignore_index).any() else -1 for m in masks)
    return largest + 1


def segmentation_probe(train: FeatureSet, test: FeatureSet, *, ignore_index: int = 255, num_classes: int | None = None,
                       lrs=(1e-3, 3e-3, 1e-2), epochs: int = 20, batch_size: int = 16, weight_decay: float = 0.0,
                       val_fraction: float = 0.2, seed: int = 0, progress: bool = False) -> dict:
    """Train and score the linear segmentation probe: ``miou``, ``pixel_accuracy``, ``per_class_iou``,
    the chosen ``lr``, ``grid`` (held-out mIoU per lr), ``loss_curve`` and the counts."""
    train_tokens, test_tokens = train.require_patch("segmentation"), test.require_patch("segmentation")
    if train.masks is None or test.masks is None:
        raise DataError("the segmentation probe needs a mask for every image (extract with with_masks=True)")
    if num_classes is None:
        num_classes = max(mask_classes(train.masks, ignore_index), mask_classes(test.masks, ignore_index))
    for split, masks in (("train", train.masks), ("test", test.masks)):
        for mask in masks:
            bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
            if bad.any():
                raise DataError(f"segmentation {split} mask value {int(mask[bad][0])} is neither a class in "
                                f"[0, {num_classes - 1}] nor ignore_index={ignore_index}; set num_classes or "
                                "ignore_index")
    dim = train_tokens.shape[-1]

    def train_model(rows: torch.Tensor, lr: float, description: str):
        with seeded(seed):
            model = PatchLinear(dim, num_classes, train.grid)
        curve = fit(model, len(rows), lambda b: pixel_loss(model, train_tokens, train.masks, rows[b], ignore_index),
                    lr=lr, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                    description=description, progress=progress)
        return model, curve

    def train_and_score(setting: dict, fit_rows: torch.Tensor, val_rows: torch.Tensor) -> float:
        model, _ = train_model(fit_rows, setting["lr"], f"segmentation lr={setting['lr']:g}")
        confusion = segmentation_confusion(model, train_tokens, train.masks, val_rows, num_classes, ignore_index)
        return mean_iou(confusion)[0]

    selection = select_on_held_out([{"lr": float(lr)} for lr in lrs], len(train), val_fraction, seed, train_and_score)
    lr = selection.best["lr"]
    model, curve = train_model(torch.arange(len(train)), lr, f"segmentation final lr={lr:g}")
    confusion = segmentation_confusion(model, test_tokens, test.masks, torch.arange(len(test)), num_classes,
                                       ignore_index)
    miou, per_class = mean_iou(confusion)
    total = int(confusion.sum())
    return {"miou": miou, "pixel_accuracy": confusion.diagonal().sum().item() / max(total, 1),
            "per_class_iou": per_class, "num_classes": num_classes, "ignore_index": ignore_index, "lr": lr,
            "grid": selection.scores, "loss_curve": curve, "num_train": len(train), "num_test": len(test),
            "grid_size": list(train.grid)}


def run(context: ProbeContext, options: dict | None = None) -> dict:
    """The suite's ``segment`` entry: options of :data:`OPTIONS`."""
    options = resolve_options("segment", OPTIONS, options, required=("train", "test"))
    train = context.features(options["train"], options, with_patch=True, with_masks=True)
    test = context.features(options["test"], options, with_patch=True, with_masks=True)
    return segmentation_probe(train, test, ignore_index=options["ignore_index"], num_classes=options["num_classes"],
                              lrs=options["lrs"], epochs=options["epochs"], batch_size=options["batch_size"],
                              weight_decay=options["weight_decay"], val_fraction=options["val_fraction"],
                              seed=context.seed, progress=context.progress)
