"""Frozen features of a dataset: one l2-normalized vector per image (k-NN), or a :class:`FeatureSet` of
raw cls, average and patch tokens with the annotations the probes need."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from wildssl.data.sample import EachImageOnce, Source, collate
from wildssl.data.views import preprocess_images  # the one input transform of every evaluation
from wildssl.errors import ConfigError, DataError
from wildssl.eval.knn import require_finite_features
from wildssl.eval.progress import progress_bar
from wildssl.models.loading import POOLS


def class_space(memory_classes: list[str], test_classes: list[str]) -> tuple[list[str], torch.Tensor]:
    """The joint class names (the memory's, then those only the test split has) and the position of each
    test class index in them, ``(len(test_classes) + 1,)`` long: the last entry maps the label -1 (no
    label) to -1, so ``position[labels]`` renumbers labels and keeps the unlabelled ones."""
    names = list(memory_classes) + [name for name in test_classes if name not in memory_classes]
    position = torch.tensor([names.index(name) for name in test_classes] + [-1], dtype=torch.long)
    return names, position


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str,
    image_size: int = 224,
    pool: str = "cls",
    normalize_images: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every batch and return ``(features (N, D) float32 l2-normalized, labels (N,) long)`` on CPU.

    ``encoder``: a module whose ``forward(x)`` returns ``{"cls": (B, D), "patch": (B, P, D)}`` (the
    wildssl ``VisionTransformer``). ``batches``: a data loader or any iterable of dicts with ``"image"``
    ``(B, 3, S, S)`` and ``"label"`` ``(B,)`` long (``-1`` = no label). Images go through
    :func:`preprocess_images` on ``device``. ``pool``: ``"cls"`` (class token) or ``"avg"`` (mean of the
    patch tokens). The encoder runs in eval mode; its previous mode is restored afterwards.

    Features stay on the CPU so that large evaluation sets do not fill accelerator memory. In a
    distributed run each rank gets the features of its own shard; gather them with
    :func:`wildssl.distributed.all_gather_no_grad`.
    """
    if pool not in POOLS:
        raise ConfigError(f"feature pool {pool!r} is unknown; use one of {', '.join(POOLS)}")
    device = torch.device(device)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="features", unit="batch")

    was_training = encoder.training
    encoder.eval()
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in batches:
            if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
                got = f"keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
                raise DataError(f"feature batch is {got}; expected dicts with 'image' (B, 3, H, W) and 'label' (B,)")
            if len(batch["image"]) != len(batch["label"]):  # else features and labels came back misaligned
                raise DataError(f"feature batch has {len(batch['image'])} images and {len(batch['label'])} labels; "
                                "give one label per image (-1: none)")
            images = preprocess_images(batch["image"].to(device, non_blocking=True), image_size, normalize_images)
            out = encoder(images)
            tokens = out["cls"] if pool == "cls" else out["patch"].mean(dim=1)
            features.append(F.normalize(tokens.float(), dim=1).cpu())
            labels.append(torch.as_tensor(batch["label"]).long().cpu())
    finally:
        encoder.train(was_training)

    if not features:
        raise DataError("feature extraction got no batches; the evaluation source is empty")
    features = torch.cat(features)
    require_finite_features(features, "the encoder's features")
    return features, torch.cat(labels)


@dataclass
class FeatureSet:
    """Everything the probes read about one dataset under one encoder (one pass over the images).

    ``cls`` and ``avg`` ``(N, D)`` float32: the class token and the mean patch token, raw (the probes
    normalize what they need). ``patch`` ``(N, P, D)`` float16 or None: every patch token on the grid
    ``grid = (h, w)`` (row-major, P = h * w); float16 halves memory and disk, a relative error near 1e-3
    that no probe resolves. ``labels`` ``(N,)`` long (-1 = none); ``multi_labels``, ``boxes`` ``(M_i, 4)``
    normalized x0, y0, x1, y1, ``box_labels`` ``(M_i,)`` and ``masks`` ``(H_i, W_i)`` long (or None) are
    per image. ``classes``: the source's class names (labels, multi-labels and box labels) or None.
    """

    cls: torch.Tensor
    avg: torch.Tensor
    patch: torch.Tensor | None
    grid: tuple[int, int]
    labels: torch.Tensor
    multi_labels: list[list[int]]
    boxes: list[torch.Tensor]
    box_labels: list[torch.Tensor]
    masks: list[torch.Tensor] | None
    classes: list[str] | None = None
    indices: torch.Tensor | None = field(default=None)  # (N,) the source index of each row

    def __len__(self) -> int:
        return self.cls.shape[0]

    def pooled(self, pool: str) -> torch.Tensor:
        """``(N, D)`` float32 features of ``pool`` ("cls" or "avg")."""
        if pool not in POOLS:
            raise ConfigError(f"feature pool {pool!r} is unknown; use one of {', '.join(POOLS)}")
        return self.cls if pool == "cls" else self.avg

    def require_patch(self, probe: str) -> torch.Tensor:
        if self.patch is None:
            raise ValueError(f"the {probe} probe needs patch tokens; extract them with with_patch=True")
        return self.patch


def base_source(source) -> Source:
    """The source itself, or the one a ``Subset`` of it draws from."""
    return source.dataset if isinstance(source, Subset) else source


@torch.no_grad()
def extract_feature_set(
    encoder: nn.Module,
    source,
    device: torch.device | str,
    image_size: int,
    with_patch: bool,
    with_masks: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> FeatureSet:
    """One pass of ``encoder`` over a source (or a ``Subset`` of one): a :class:`FeatureSet`.

    Images go through :func:`preprocess_images` at ``image_size``; the encoder runs in eval mode (its
    mode is restored afterwards) and must return ``{"cls", "patch"}`` like the wildssl ViT. Masks are
    read with ``source.mask(index)`` when ``with_masks`` (a DataError when an image has none).
    """
    device = torch.device(device)
    base = base_source(source)
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    batches = progress_bar(EachImageOnce(loader), "features", progress)  # an unreadable image left out, not repeated
    was_training = encoder.training
    encoder.eval()
    cls, avg, patch, labels, indices = [], [], [], [], []
    multi_labels, boxes, box_labels, masks = [], [], [], []
    grid = None
    try:
        for batch in batches:
            images = preprocess_images(batch["image"].to(device, non_blocking=True), image_size)
            out = encoder(images)
            cls.append(out["cls"].float().cpu())
            avg.append(out["patch"].float().mean(dim=1).cpu())
            if with_patch:
                patch.append(out["patch"].half().cpu())
            grid = (image_size // encoder.patch_size, image_size // encoder.patch_size)
            labels.append(batch["label"].long())
            indices.append(batch["index"].long())
            multi_labels.extend(list(map(list, batch["labels"])))
            boxes.extend(b.float() for b in batch["boxes"])
            box_labels.extend(b.long() for b in batch["box_labels"])
            if with_masks:
                for index in batch["index"].tolist():
                    mask = base.mask(index)
                    if mask is None:
                        raise DataError(f"image {index} of {base.describe()} has no mask; the segmentation "
                                        "and discovery probes need a per-pixel class map for every image "
                                        "(a 'mask' key in a .jsonl manifest)")
                    masks.append(mask.long())
    finally:
        encoder.train(was_training)
    if not cls:
        raise DataError("feature extraction got no batches; the evaluation source is empty")
    cls, avg = torch.cat(cls), torch.cat(avg)
    for pooled, name in ((cls, "class tokens"), (avg, "average patch tokens")):
        require_finite_features(pooled, f"the encoder's {name} on {base.describe()}")
    return FeatureSet(cls=cls, avg=avg, patch=torch.cat(patch) if with_patch else None,
                      grid=grid, labels=torch.cat(labels), multi_labels=multi_labels, boxes=boxes,
                      box_labels=box_labels, masks=masks if with_masks else None,
                      classes=getattr(base, "classes", None), indices=torch.cat(indices))
