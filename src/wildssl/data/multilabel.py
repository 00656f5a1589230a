"""Image-level multi-label targets for weakly-supervised pre-training: from a manifest's ``labels`` or
from the captions through a :class:`~wildssl.data.vocabulary.Vocabulary`.

A collated batch (:func:`wildssl.data.sample.collate`) carries both per sample: ``labels`` (indices into
the source's ``classes``) and ``captions``. :func:`batch_labels` picks one; :func:`multi_hot` makes the
``(B, K)`` target of :func:`wildssl.losses.wsp_loss.wsp_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wildssl.data.vocabulary import Vocabulary
from wildssl.errors import DataError

LABEL_SOURCES = ("captions", "manifest")


def batch_labels(batch: dict, vocabulary: Vocabulary | None) -> list[list[int]]:
    """Each image's label indices: its captions mapped through ``vocabulary`` (all captions of the image
    together), or, with ``vocabulary=None``, the manifest's ``labels``."""
    if vocabulary is None:
        return [list(labels) for labels in batch["labels"]]
    return [vocabulary.labels_of(captions or [caption])
            for captions, caption in zip(batch["captions"], batch["caption"])]


def multi_hot(labels: Sequence[Sequence[int]], num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``B`` lists of label indices -> ``(B, num_classes)`` float 0/1; an index out of range is a DataError."""
    target = torch.zeros(len(labels), num_classes)
    for row, indices in enumerate(labels):
        bad = [i for i in indices if not 0 <= i < num_classes]
        if bad:
            raise DataError(f"label index {bad[0]} is outside the {num_classes} labels of the head; the data's "
                            "labels and the vocabulary (or manifest classes) the run was built with differ")
        target[row, list(indices)] = 1.0
    return target.to(device, non_blocking=True)
