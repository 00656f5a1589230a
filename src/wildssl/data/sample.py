"""The sample schema every source returns, the :class:`Source` interface, and batch collation.

``source[i]`` is a deterministic function of ``i`` (so a run resumes exactly from a step count) and
returns one sample dict:

=============  ====================================================================================
image          uint8 (3, S, S): decoded RGB resized to the square ``load_size`` S (Pillow bilinear,
               anisotropic; normalized box coordinates are unchanged by it)
aspect         float, width / height of the original image
label          int, class index (-1 = none)
labels         list[int], image-level multi-label (maybe empty)
caption        str: one of ``captions``, ``captions[index % len(captions)]``, so each image keeps the
               same caption in every epoch and different images use different caption positions;
               "" when there is none
captions       list[str], all captions
boxes          float32 (M, 4) normalized x0, y0, x1, y1 of the original image (M may be 0)
box_labels     long (M,), class index per box (-1 = none)
index          int, the index actually returned (see below)
corrupt        list[int], indices of the unreadable images skipped to produce this sample (a source
               skips an unreadable item i for i + 1, i + 2, ...; usually empty)
num_corrupt    int, ``len(corrupt)``
jpeg           only with ``data.decode: gpu`` (:mod:`wildssl.data.gpu_decode`), and only where the device
               decodes the image: ``{"data": the JPEG file's bytes, uint8 (N,), "pixels": W * H}``;
               ``image`` is then None
=============  ====================================================================================
"""

from __future__ import annotations

import abc
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

DEFAULT_LOAD_SIZE = 224


class Source(Dataset, abc.ABC):
    """A map-style data source; see the module docstring for the sample dict.

    Attributes:
        classes: class names indexed by ``label`` / ``labels`` / ``box_labels``, or ``None`` when the
            labels are bare integers or there are none.
        load_size: side S of the square images returned.
    """

    classes: list[str] | None = None
    load_size: int

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def class_labels(self) -> list[int] | None:
        """The ``label`` of every item (-1 = none) without decoding any image, or None when the source
        cannot tell without decoding. Evaluation uses it to find a labelled split cheaply."""
        return None

    def captioned_count(self) -> int | None:
        """How many items have a caption, without decoding any image; None when the source cannot tell (streamed
        shards). The CLIP family checks its caption stream with it."""
        return None

    def mask(self, index: int) -> torch.Tensor | None:
        """The per-pixel class map of item ``index``: ``(H, W)`` long at the resolution of the original
        image (its mask file, or the render), or None when the item has none. Kept out of the sample
        dict: training never reads masks, and their sizes differ from the square ``image``. Evaluation
        (linear segmentation, object discovery) reads them by the sample's ``index``."""
        return None

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs: kind, location, size, classes."""


def make_sample(
    image: torch.Tensor,
    aspect: float,
    index: int,
    *,
    label: int = -1,
    labels: Sequence[int] = (),
    captions: Sequence[str] = (),
    boxes: Sequence[Sequence[float]] = (),
    box_labels: Sequence[int] | None = None,
    corrupt: Sequence[int] = (),
    jpeg: dict | None = None,
) -> dict[str, Any]:
    """Assemble a sample dict (module docstring) from an image (3, S, S) uint8 and its annotations, or from
    a JPEG file ``jpeg`` left for the device to decode, with ``image`` None."""
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if box_labels is None:
        box_labels = [-1] * len(box_tensor)
    captions = list(captions)
    sample = {
        "image": image,
        "aspect": float(aspect),
        "label": int(label),
        "labels": [int(v) for v in labels],
        "caption": captions[index % len(captions)] if captions else "",
        "captions": captions,
        "boxes": box_tensor,
        "box_labels": torch.tensor(list(box_labels), dtype=torch.long),
        "index": int(index),
        "corrupt": [int(i) for i in corrupt],
        "num_corrupt": len(corrupt),
    }
    if jpeg is not None:
        sample["jpeg"] = jpeg
    return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts: image (B, 3, S, S) uint8, aspect (B,) float32, label (B,) long, index (B,) long,
    caption list[str]; labels, captions, boxes (M_b, 4) and box_labels (M_b,) stay per-sample lists
    because their lengths differ. ``corrupt`` is the sorted list of the distinct unreadable items the
    samples skipped and ``num_corrupt`` its length: two samples skipping the same file count it once.

    When some samples hold a ``jpeg`` file (``data.decode: gpu``), ``jpeg`` is the list of them (None where a
    worker decoded the image) and ``image`` the list of the decoded images (None where ``jpeg`` is set), for
    :class:`wildssl.data.gpu_decode.DeviceDecoder` to assemble into (B, 3, S, S) on the device."""
    corrupt = sorted({i for s in samples for i in s["corrupt"]})
    jpegs = [s.get("jpeg") for s in samples]
    pending = any(jpeg is not None for jpeg in jpegs)
    batch = {
        "image": [s["image"] for s in samples] if pending else torch.stack([s["image"] for s in samples]),
        "aspect": torch.tensor([s["aspect"] for s in samples], dtype=torch.float32),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "corrupt": corrupt,
        "num_corrupt": len(corrupt),
        "caption": [s["caption"] for s in samples],
        "captions": [s["captions"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "boxes": [s["boxes"] for s in samples],
        "box_labels": [s["box_labels"] for s in samples],
    }
    if pending:
        batch["jpeg"] = jpegs
    return batch


class EachImageOnce:
    """Collated batches (:func:`collate`) with every image kept once, for evaluation; as long as ``batches``
    (so that a progress bar knows its total).

    A file-backed source answers an unreadable item with the next readable one (:mod:`wildssl.data.decode`), so
    that training batches keep their size; that image then comes twice or more. In a feature set each copy would
    be a neighbour and a test image of its own, and an unreadable class would be filled with another class's
    images. Rows whose ``index`` (the image actually read) was already seen are left out, so the readable images
    each remain once, and a batch left empty is skipped. ``corrupt`` and ``num_corrupt`` stay as they were."""

    def __init__(self, batches: Iterable[dict[str, Any]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        seen: set[int] = set()
        for batch in self.batches:
            keep = []
            for row, index in enumerate(batch["index"].tolist()):
                if index not in seen:
                    seen.add(index)
                    keep.append(row)
            if len(keep) == len(batch["index"]):
                yield batch
            elif keep:
                yield _rows(batch, keep)


def _rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The collated ``batch`` cut to ``rows``: per-image tensors and lists, the batch-level ``corrupt`` kept."""
    index = torch.tensor(rows, dtype=torch.long)
    cut = {}
    for key, value in batch.items():
        if key in ("corrupt", "num_corrupt"):
            cut[key] = value
        elif torch.is_tensor(value):
            cut[key] = value[index]
        else:
            cut[key] = [value[row] for row in rows]
    return cut
