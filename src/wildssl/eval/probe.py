"""What every trained probe shares: options, the held-out split, the fitting loop, the lr selection, scores.

Protocol (MAE's linear probe and seed 000's probes, reduced): a probe is trained on frozen features of
the train split with AdamW and a cosine learning rate; each setting of a small grid (learning rate, and
cls vs average pooling for the linear probe) is trained on ``1 - val_fraction`` of the train split and
scored on the held-out rest; the best setting is trained again on the whole train split and scored
once on the test split. Everything is seeded: the same features give the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wildssl.errors import ConfigError, DataError
from wildssl.eval.cache import FeatureStore
from wildssl.eval.features import FeatureSet, class_space
from wildssl.eval.progress import progress_bar

log = logging.getLogger("wildssl")

# Keys every probe section of a suite accepts, beside its own.
COMMON_OPTIONS: dict[str, Any] = {"image_size": None, "load_size": None}


@dataclass
class ProbeContext:
    """What a probe gets besides its options: the encoder's feature store, the default eval resolution,
    the seed, whether to show progress, where to write pictures (None: nowhere) and the suite entry's
    name (pictures are named after it)."""

    store: FeatureStore
    image_size: int
    seed: int = 0
    progress: bool = False
    out_dir: Path | None = None
    name: str = "probe"

    def features(self, spec: str, options: dict, with_patch: bool = False, with_masks: bool = False) -> FeatureSet:
        image_size = options.get("image_size") or self.image_size
        return self.store.features(spec, image_size, options.get("load_size"), with_patch, with_masks)


def resolve_options(probe: str, defaults: dict[str, Any], given: dict[str, Any] | None,
                    required: Sequence[str] = ()) -> dict[str, Any]:
    """``defaults`` updated by ``given`` (strict: an unknown key is a ConfigError listing the valid ones);
    every key in ``required`` must end up set."""
    valid = {**COMMON_OPTIONS, **defaults}
    given = dict(given or {})
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} of the {probe} probe; valid options: "
                          f"{', '.join(sorted(valid))}")
    for key, value in given.items():
        given[key] = _checked_option(probe, key, value, valid[key])
        _check_range(probe, key, given[key])
    options = {**valid, **given}
    for key in required:
        if options[key] in (None, ""):
            raise ConfigError(f"the {probe} probe needs {key!r} (a data SPEC: folder, .jsonl, tar shards or "
                              "synthetic:scenes?...)")
    return options


# Options without a default whose value is a data SPEC (the others without a default are whole numbers).
SPEC_OPTIONS = ("train", "test", "data")
# The range of each numeric option, by name (lowest, highest, whether the lowest itself is excluded), checked
# with the types before anything runs: the probes check them too, but only when their turn comes.
OPTION_RANGES: dict[str, tuple[float, float | None, bool]] = {
    **{key: (1, None, False) for key in ("epochs", "batch_size", "episodes", "k_shot", "n_query", "k", "width",
                                         "depth", "heads", "num_classes", "image_size", "load_size")},
    "n_way": (2, None, False),
    "pictures": (0, None, False),
    "weight_decay": (0.0, None, False),
    "temperature": (0.0, None, True),
    "mass": (0.0, 1.0, True),
    "val_fraction": (0.0, 1.0, True),  # and below 1: checked where it is used
}


def _checked_option(probe: str, key: str, value: Any, default: Any) -> Any:
    """``value`` if it has the type of ``default`` (an int where an int is expected, a number where a float
    is, a list of numbers or strings where such a list is: a single one is taken as a list of one), else a
    ConfigError naming the option and what it wants (a typo like ``--set lrs=1e-3,1e-2`` would otherwise
    end in a traceback deep in the probe)."""
    def wrong(wanted: str) -> ConfigError:
        return ConfigError(f"option {key!r} of the {probe} probe must be {wanted}, got {value!r}")

    def is_number(x: Any) -> bool:  # NaN and infinity are no option's value (NaN passes every range check)
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if isinstance(default, list):
        items = value if isinstance(value, list) else [value]
        if default and is_number(default[0]):
            if not items or not all(is_number(x) and x > 0 for x in items):
                raise wrong(f"a list of positive numbers (like {default})")
        elif not items or not all(isinstance(x, str) for x in items):
            raise wrong(f"a list of names (like {default})")
        return items
    if value is None:
        if default is not None:  # `--set epochs=` (or `epochs:` left blank) ended in a comparison with None
            raise wrong(f"a {'number' if isinstance(default, float) else 'value'} (like {default!r}), not empty")
        return value
    if key in SPEC_OPTIONS or isinstance(default, str):
        if not isinstance(value, str):
            raise wrong("a data SPEC (a folder, .jsonl, tar shards or synthetic:scenes?...)" if key in SPEC_OPTIONS
                        else f"a name (like {default!r})")
    elif isinstance(default, float):
        if not is_number(value):
            raise wrong(f"a number (like {default})")
        return float(value)
    else:  # an int default, or none (sizes, counts); 1e3 is a whole number, as for config keys
        if not is_number(value) or (isinstance(value, float) and not value.is_integer()):
            raise wrong("a whole number" + (f" (like {default})" if default is not None else ""))
        return int(value)
    return value


def _check_range(probe: str, key: str, value: Any) -> None:
    """A ConfigError naming the option when a number lies outside :data:`OPTION_RANGES`."""
    if key not in OPTION_RANGES or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high, open_low = OPTION_RANGES[key]
    if (value <= low if open_low else value < low) or (high is not None and value > high):
        wanted = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"option {key!r} of the {probe} probe must be {wanted}, got {value!r}")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def held_out_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into (fit, val) indices; val holds
    ``round(val_fraction * n)`` items, at least one, and fit at least one."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be in (0, 1)")
    if n < 2:
        raise DataError(f"a probe needs at least 2 training images to hold some out, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    return order[n_val:], order[:n_val]


def fit(model: nn.Module, n: int, batch_loss: Callable[[torch.Tensor], torch.Tensor], *, lr: float, epochs: int,
        batch_size: int, weight_decay: float, seed: int, description: str = "probe",
        progress: bool = False) -> list[float]:
    """Train ``model`` with AdamW on ``n`` items: ``batch_loss(indices)`` returns the loss of a mini-batch of
    item indices ``(b,)`` (into whatever the caller indexes). Cosine learning rate from ``lr`` to 0 over
    all iterations; shuffled by a generator seeded with ``seed``. Returns the mean loss of every epoch."""
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"a probe needs epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    curve = []
    model.train()
    step = 0
    for _ in progress_bar(range(epochs), description, progress):
        order = torch.randperm(n, generator=generator)
        losses = []
        for start in range(0, n, batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = batch_loss(order[start:start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        curve.append(sum(losses) / len(losses))
    model.eval()
    return curve


@torch.no_grad()
def predict(model: nn.Module, n: int, batch_forward: Callable[[torch.Tensor], torch.Tensor],
            batch_size: int = 256) -> torch.Tensor:
    """``batch_forward(indices)`` over ``range(n)`` in eval mode, concatenated along dim 0."""
    model.eval()
    outputs = [batch_forward(torch.arange(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    return torch.cat(outputs)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5),
                  learned: torch.Tensor | None = None) -> dict[str, float]:
    """Fractions of rows whose label is among the ``k`` largest logits, ``{"top1": ..., "top5": ...}``;
    a ``k`` of at least the number of classes is left out (it would be 1). ``learned``: the labels of the
    training images; only their classes are ranked (a class the probe never saw has an untrained output,
    which could rank among the top 5 and credit an image of that class), and ``k`` must be below their count."""
    if learned is not None:
        classes = torch.unique(learned[learned >= 0])
        position = torch.full((logits.shape[1] + 1,), -1, dtype=torch.long)  # the last entry maps the label -1
        position[classes] = torch.arange(len(classes))
        logits, labels = logits[:, classes], position[labels.long()]
    result = {}
    for k in ks:
        if k < logits.shape[1] or k == 1:
            top = logits.topk(k, dim=1).indices
            result[f"top{k}"] = (top == labels[:, None]).any(dim=1).float().mean().item()
    return result


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` long counts; row = true class, column = predicted class."""
    index = labels.long() * num_classes + predicted.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_count(classes: list[str] | None, *labels: torch.Tensor) -> int:
    """The number of classes: the source's class names, else one more than the largest label seen."""
    if classes:
        return len(classes)
    largest = max((int(t.max()) for t in labels if t.numel()), default=-1)
    return largest + 1


def align_classes(train: FeatureSet, test: FeatureSet, probe: str = "probe") -> tuple[FeatureSet, FeatureSet]:
    """Both splits in one class space. Two manifests name their classes by their own sorted names, so the
    same index can mean different classes: when both splits have class names, the test split's labels,
    multi-labels and box labels are renumbered into the train split's names, and names only the test split
    has are appended (the probe never learns them, so those images count as errors, as they should). The
    test images' classes that the train split lacks (a misspelt class folder, say) are named in one warning."""
    if not train.classes or not test.classes or train.classes == test.classes:
        return train, test
    used = sorted({int(v) for v in test.labels.tolist() if v >= 0})
    unseen = [test.classes[v] for v in used if test.classes[v] not in train.classes]
    if unseen:
        log.warning("%s: %d of the %d classes of the test images are not among the train split's classes, so "
                    "their images count as errors: %s", probe, len(unseen), len(used), ", ".join(unseen))
    classes, position = class_space(train.classes, test.classes)  # the label -1 stays -1

    def renumber(labels: torch.Tensor) -> torch.Tensor:
        return position[labels.long()]  # -1 picks the last entry, -1

    aligned = dataclasses.replace(
        test, labels=renumber(test.labels), box_labels=[renumber(b) for b in test.box_labels],
        multi_labels=[[classes.index(test.classes[v]) for v in labels] for labels in test.multi_labels],
        classes=classes)
    return dataclasses.replace(train, classes=classes), aligned


def require_labels(features: FeatureSet, probe: str, split: str) -> torch.Tensor:
    """The labels of a split, every one a class (a DataError naming the split otherwise)."""
    labels = features.labels
    if labels.numel() == 0 or (labels < 0).any():
        missing = int((labels < 0).sum())
        raise DataError(f"the {probe} probe needs a class label for every image, but its {split} split has "
                        f"{missing} of {len(labels)} unlabelled (use an image folder with class subfolders, a "
                        "manifest with 'label', or synthetic:scenes)")
    return labels


@dataclass
class Selection:
    """The grid, each setting's held-out score, and the best setting (the first best on a tie)."""

    scores: list[dict]
    best: dict


def select_on_held_out(settings: list[dict], n_train: int, val_fraction: float, seed: int,
                       train_and_score: Callable[[dict, torch.Tensor, torch.Tensor], float]) -> Selection:
    """Score every setting: ``train_and_score(setting, fit_indices, val_indices)`` trains on the first and
    returns a score on the second (higher is better). A grid of one setting has nothing to choose: it is
    not trained on the held-out split, and its score is None."""
    if len(settings) == 1:
        return Selection(scores=[{**settings[0], "val": None}], best=dict(settings[0]))
    fit_indices, val_indices = held_out_split(n_train, val_fraction, seed)
    scores = []
    for setting in settings:
        scores.append({**setting, "val": train_and_score(setting, fit_indices, val_indices)})
    best = max(scores, key=lambda s: s["val"])  # max keeps the first of equal scores
    return Selection(scores=scores, best={k: v for k, v in best.items() if k != "val"})
