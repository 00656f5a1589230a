"""WSP: weakly-supervised pre-training on labels from captions or hashtags (SWAG, Singh et al., CVPR 2022;
MAWS, Singh et al., ICCV 2023, its second stage after MAE pre-pretraining).

One view per image (RandomResizedCrop + horizontal flip, no colour augmentation, as SWAG) -> ViT -> cls
token -> a linear head over the label vocabulary; loss :func:`wildssl.losses.wsp_loss.wsp_loss` (softmax
cross-entropy against the normalized multi-hot target).

Where the labels come from (``method.labels``):

- ``captions``: each image's captions mapped through a :class:`~wildssl.data.vocabulary.Vocabulary`: the
  file ``method.vocabulary``, or, when it is null, one of ``method.vocabulary_size`` labels built from the
  training captions when the run is built (as ``wildssl vocab build`` does). Either way the vocabulary is
  saved as ``vocabulary.txt`` in the run directory, where a resumed run and evaluation find it.
- ``manifest``: the ``labels`` of a ``.jsonl`` manifest (class names; the head has one output per class).

The head is sized from that label set in :meth:`WSP.prepare`, before the checkpoint of a resumed run is
loaded. MAE -> WSP (MAWS) is ``model.init_from: <an MAE run or export>`` (:meth:`Method.init_encoder_from`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from wildssl import distributed as dist
from wildssl.data.multilabel import LABEL_SOURCES, batch_labels, multi_hot
from wildssl.data.views import CropSpec, make_views
from wildssl.data.vocabulary import VOCABULARY_FILENAME, Vocabulary
from wildssl.data.vocabulary_build import build_vocabulary
from wildssl.data.workers import resolve_num_workers
from wildssl.errors import CheckpointError, ConfigError
from wildssl.losses.wsp_loss import wsp_loss
from wildssl.methods.base import Method, StepContext, check_pool, normalized_embedding_std, pooled

# As CLIP's tokenizer: word frequencies settle long before this many images.
MAX_VOCABULARY_IMAGES = 100_000


def _captions_per_image(samples: list[dict]) -> list[list[str]]:
    # Module-level (not a lambda) so DataLoader workers can pickle it under any start method.
    return [sample["captions"] or ([sample["caption"]] if sample["caption"] else []) for sample in samples]


def captions_per_image(source, max_images: int = MAX_VOCABULARY_IMAGES, num_workers: int = 0):
    """The captions of up to ``max_images`` images of ``source``, one list per image, evenly spaced over it;
    a streamed source gives its captions alone (each counted as its own image)."""
    if getattr(source, "streaming", False):
        for caption in source.captions(max_images):
            yield [caption]
        return
    count = min(len(source), max_images)
    indices = np.unique(np.linspace(0, len(source) - 1, count).round().astype(np.int64)).tolist()
    loader = DataLoader(Subset(source, indices), batch_size=256, num_workers=num_workers,
                        collate_fn=_captions_per_image)
    for images in loader:
        yield from images


class WSP(Method):
    """Weakly-supervised pre-training: ``student = {backbone, head}``; no teacher.

    Config keys (``method.*``): ``labels`` (captions or manifest), ``vocabulary`` (a vocabulary file, or null
    to build one of ``vocabulary_size`` labels from the training captions), ``crop_size``, ``crop_scale``
    (RandomResizedCrop area range; flip 0.5), ``pool`` (cls or avg: what the head reads).
    """

    name = "wsp"
    defaults = {
        "labels": "captions",
        "vocabulary": None,
        "vocabulary_size": 1000,
        "crop_size": 224,
        "crop_scale": [0.08, 1.0],
        "pool": "cls",
    }
    eval_network = "student"

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        if o["labels"] not in LABEL_SOURCES:
            raise ConfigError(f"method.labels={o['labels']!r} is not one of {', '.join(LABEL_SOURCES)}")
        if o["labels"] == "manifest" and o["vocabulary"]:
            raise ConfigError("method.vocabulary is only read with method.labels=captions; drop it or set "
                              "method.labels=captions")
        check_pool(o["pool"])
        self.specs = [CropSpec(o["crop_size"], tuple(o["crop_scale"]), photometric=None)]
        self.vocabulary: Vocabulary | None = None  # set by prepare() with labels=captions
        self.class_names: list[str] = []

    # -- labels and head -------------------------------------------------------------------------------
    def prepare(self, sources: dict, run_dir) -> None:
        """Find the label set (module docstring) and add the head over it to the student."""
        o = self.options
        if o["labels"] == "manifest":
            classes = getattr(sources["train"], "classes", None)
            if not classes:
                raise ConfigError("method.labels=manifest needs class names: an image folder with class subfolders, "
                                  "or a .jsonl manifest whose 'labels' are class names "
                                  f"(data.train={self.config['data']['train']!r} has none); or use "
                                  "method.labels=captions")
            self.class_names = list(classes)
        else:
            source = sources.get("train")
            if not o["vocabulary"] and getattr(source, "captioned_count", lambda: None)() == 0:
                labelled = "; it has class names: set method.labels=manifest to learn those" if getattr(
                    source, "classes", None) else ""
                raise ConfigError(f"method.labels=captions learns the words of data.train's captions, and data.train "
                                  f"({source.describe()}) has none (give a .jsonl with 'captions'){labelled}")
            path = Path(run_dir) / VOCABULARY_FILENAME
            if dist.is_main_process() and not path.is_file():
                if o["vocabulary"]:
                    vocabulary = Vocabulary.load(o["vocabulary"])
                    header = f"copied from {o['vocabulary']}"
                else:
                    workers = resolve_num_workers(self.config["data"]["num_workers"])
                    vocabulary, _ = build_vocabulary(captions_per_image(sources["train"], num_workers=workers),
                                                     o["vocabulary_size"])
                    header = f"built from the captions of {self.config['data']['train']}"
                path.parent.mkdir(parents=True, exist_ok=True)
                vocabulary.save(path, header=f"wildssl WSP label vocabulary, {header}")
            dist.barrier()
            self.vocabulary = Vocabulary.load(path)
            if o["vocabulary"] and Vocabulary.load(o["vocabulary"]).labels != self.vocabulary.labels:
                raise CheckpointError(f"{path} differs from method.vocabulary={o['vocabulary']}; resume with the "
                                      "vocabulary the run started with, or use a new --out directory")
            self.class_names = self.vocabulary.labels
        backbone = self.student["backbone"]
        head = nn.Linear(backbone.embed_dim, len(self.class_names))
        # Small random weights and zero bias: every label starts equally likely (timm's classifier init).
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.student["head"] = head.to(backbone.pos_embed.device)

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def _check_prepared(self) -> None:
        if "head" not in self.student:
            raise RuntimeError("method wsp: call prepare(sources, run_dir) before training (it sizes the head)")

    def targets(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The ``(B, K)`` multi-hot target of a collated batch."""
        self._check_prepared()
        return multi_hot(batch_labels(batch, self.vocabulary), self.num_labels, device)

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        self._check_prepared()  # before the head is read (a KeyError: 'head' said nothing of prepare)
        batch = batches["train"]
        (view,) = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        features = pooled(self.student["backbone"](view.images), self.options["pool"])
        logits = self.student["head"](features)
        targets = self.targets(batch, logits.device)
        loss = wsp_loss(logits, targets)
        with torch.no_grad():
            labelled = targets.sum(dim=1) > 0
            top1 = targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
            metrics = {"labelled_fraction": labelled.float().mean(),
                       "top1_in_labels": (top1[labelled].mean() if labelled.any() else top1.sum() * 0.0),
                       "embedding_std": normalized_embedding_std(features)}
        return {"loss": loss, "metrics": metrics}
