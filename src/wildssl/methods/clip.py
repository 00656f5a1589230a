"""CLIP (Radford et al. 2021): an image tower and a caption tower trained with a symmetric InfoNCE loss.

Image: one RandomResizedCrop view (open_clip's training transform: scale (0.9, 1), no flip, no photometric
augmentation) -> ViT -> pooled token -> linear projection (no bias). Text: the run's caption tokenizer ->
causal text transformer -> projection at the EOT token. Loss: :func:`wildssl.losses.clip_loss.clip_loss`
with the learned logit scale, over the global batch.

The tokenizer is data, not weights: :meth:`CLIP.prepare` trains it (BPE) or makes it (bytes) once per run
and saves it as ``tokenizer.json`` in the run directory, where a resumed run and evaluation tools find it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from wildssl.data.views import CropSpec, make_views
from wildssl.data.workers import resolve_num_workers
from wildssl.errors import CheckpointError, ConfigError, DataError
from wildssl.losses.clip_loss import clip_accuracy, clip_loss
from wildssl.models.logit_scale import LogitScale
from wildssl.methods.base import (AnnotationInput, AnnotationSpace, Method, StepContext, check_pool,
                                  normalized_embedding_std, pooled)
from wildssl.models.text import TEXT_SIZES, build_text_tower
from wildssl.models.tokenizer import (PAD_ID, SPECIAL_TOKENS, TOKENIZER_FILENAME, ByteTokenizer, CaptionTokenizer,
                                      build_tokenizer)
from wildssl import distributed as dist

log = logging.getLogger("wildssl")

# BPE merges stabilise long before this many captions; reading more would only decode more images
# (a source yields its captions with its images) while the other ranks wait at the barrier.
MAX_TOKENIZER_IMAGES = 100_000
_BYTE_VOCAB = len(SPECIAL_TOKENS) + 256


def _captions_of_samples(samples: list[dict]) -> list[str]:
    # Module-level (not a lambda) so DataLoader workers can pickle it under any start method.
    captions = []
    for sample in samples:
        captions.extend(sample["captions"] or ([sample["caption"]] if sample["caption"] else []))
    return captions


def source_captions(source, max_images: int = MAX_TOKENIZER_IMAGES, num_workers: int = 0) -> Iterator[str]:
    """Every caption of up to ``max_images`` images of ``source``, evenly spaced over it (so a sharded
    source contributes from every shard, not only its first). Images are decoded by ``num_workers``
    DataLoader workers because sources return captions together with their images. A streamed source
    (tar shards) reads its captions alone, from shards spread over the set."""
    if getattr(source, "streaming", False):
        yield from source.captions(max_images)
        return
    count = min(len(source), max_images)
    indices = np.unique(np.linspace(0, len(source) - 1, count).round().astype(np.int64)).tolist()
    loader = DataLoader(Subset(source, indices), batch_size=256, num_workers=num_workers,
                        collate_fn=_captions_of_samples)
    for captions in loader:
        yield from captions


def _text_size(options: dict) -> str:
    """The text tower's named size; a warning when ``text_depth``, ``text_width`` and ``text_heads`` leave it unused."""
    size = options["text_size"]
    if size is not None and size not in TEXT_SIZES:
        raise ConfigError(f"method.text_size={size!r} is not one of {', '.join(TEXT_SIZES)} (or null)")
    if size is not None and all(options[f"text_{key}"] is not None for key in ("depth", "width", "heads")):
        log.warning("method.text_size=%s is not used: method.text_depth, text_width and text_heads set every "
                    "dimension of the text tower (%s blocks, %s wide, %s heads)", size,
                    options["text_depth"], options["text_width"], options["text_heads"])
    return size or "small"


class CLIP(Method):
    name = "clip"
    min_batch = (2, False, "contrasts each image with the captions of the other images of the batch")
    defaults = {
        "embed_dim": 512,
        "text_size": None,  # a TEXT_SIZES name; null: "small", or whatever text_depth/width/heads set
        "text_depth": None,
        "text_width": None,
        "text_heads": None,
        "context_length": 77,
        "tokenizer": "bpe",
        "vocab_size": 8192,
        "crop_size": 224,
        "crop_scale": [0.9, 1.0],
        "pool": "cls",
    }

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        if o["tokenizer"] not in ("bpe", "byte"):
            raise ConfigError(f"method.tokenizer={o['tokenizer']!r} is not one of bpe, byte")
        if not isinstance(o["vocab_size"], int) or o["vocab_size"] < _BYTE_VOCAB:
            raise ConfigError(f"method.vocab_size={o['vocab_size']!r} is too small for the {o['tokenizer']} "
                              f"tokenizer, which needs at least {_BYTE_VOCAB} ids (3 special + 256 bytes)")
        check_pool(o["pool"])
        width = self.student["backbone"].embed_dim
        self.student["image_proj"] = nn.Linear(width, o["embed_dim"], bias=False)
        nn.init.normal_(self.student["image_proj"].weight, std=width**-0.5)  # open_clip's visual proj init
        self.student["text"] = build_text_tower(_text_size(o), o["vocab_size"], o["embed_dim"],
                                                o["context_length"], depth=o["text_depth"],
                                                width=o["text_width"], heads=o["text_heads"])
        self.student["logit_scale"] = LogitScale()
        self.specs = self.view_specs()
        self.tokenizer: CaptionTokenizer | None = None  # set by prepare(); data, so not in the state dict

    def view_specs(self) -> list[CropSpec]:
        """The views ``forward`` draws from every image; CLIP's contrastive view comes first."""
        o = self.options
        return [CropSpec(o["crop_size"], tuple(o["crop_scale"]), flip_prob=0.0)]

    # -- tokenizer ---------------------------------------------------------------------------------
    def prepare(self, sources: dict, run_dir) -> None:
        """Load ``run_dir/tokenizer.json`` if it exists (a resumed run); otherwise rank 0 builds it (the
        byte tokenizer, or BPE trained on the captions of up to :data:`MAX_TOKENIZER_IMAGES` images of
        the first stream's source) and saves it there, and every rank then loads that file."""
        path = Path(run_dir) / TOKENIZER_FILENAME
        if dist.is_main_process() and not path.is_file():
            self.check_data(sources)
            o = self.options
            captions = None
            if o["tokenizer"] == "bpe":
                workers = resolve_num_workers(self.config["data"]["num_workers"])
                captions = source_captions(sources[self.streams[0]], num_workers=workers)
                first = next(captions, None)
                if first is None:
                    raise DataError(f"method {self.name} found no captions to train its BPE tokenizer on; "
                                    f"{self._give_captions()}")
                captions = itertools.chain([first], captions)
            tokenizer = build_tokenizer(o["tokenizer"], captions, vocab_size=o["vocab_size"])
            path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(path)  # atomic: a crash never leaves half a tokenizer beside a checkpoint
        dist.barrier()
        self.tokenizer = self._checked(CaptionTokenizer.load(path), path)

    def check_data(self, sources: dict) -> None:
        """Every image of the caption stream should have a caption: one without trains against the empty
        caption, which all such images share (each is then a false negative of the others). None at all is an
        error; some missing, a warning naming how many. Sources that cannot count without decoding are let be."""
        source = sources.get(self.streams[0])
        count = source.captioned_count() if hasattr(source, "captioned_count") else None
        if count is None or count == len(source):
            return
        if count == 0:
            raise DataError(f"method {self.name} learns from captions, but there are no captions in "
                            f"{source.describe()}; {self._give_captions()}")
        log.warning("%s: %d of the %d images of data.%s have no caption; each trains against the empty caption "
                    "they all share (caption them, or leave them out of this stream)", self.name, len(source) - count,
                    len(source), self.streams[0])

    def _give_captions(self) -> str:
        stream = self.streams[0]
        return (f"give data.{stream} ({self.config['data'][stream]}) a source with captions (a .jsonl manifest "
                "with 'caption', tar shards with .txt, or synthetic:scenes)")

    def _checked(self, tokenizer: CaptionTokenizer, path: Path) -> CaptionTokenizer:
        o = self.options
        if isinstance(tokenizer, ByteTokenizer) != (o["tokenizer"] == "byte"):
            raise CheckpointError(f"{path} holds a {type(tokenizer).__name__} but method.tokenizer={o['tokenizer']}; "
                                  "use the run's own settings or a new --out directory")
        if tokenizer.vocab_size > o["vocab_size"]:
            raise CheckpointError(f"{path} has {tokenizer.vocab_size} ids, more than the text tower's "
                                  f"method.vocab_size={o['vocab_size']}; use the run's own settings")
        return tokenizer

    def tokenize(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """Captions -> ``(B, L)`` ids on ``device``, ``L <= context_length``: trailing all-padding
        columns are cut, which changes no output (causal attention, pooled at the EOT) but saves
        compute when captions are short."""
        if self.tokenizer is None:
            raise RuntimeError(f"method {self.name}: call prepare(sources, run_dir) before encoding captions")
        tokens = self.tokenizer.encode_batch(captions, self.options["context_length"])
        length = int((tokens != PAD_ID).sum(dim=1).max())
        return tokens[:, :length].to(device, non_blocking=True)

    # -- towers ------------------------------------------------------------------------------------
    def project_images(self, networks: nn.ModuleDict, features: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, width)`` -> image embeddings ``(B, embed_dim)``, unnormalized."""
        return networks["image_proj"](features)

    def encode_images(self, networks: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
        """Normalized images ``(B, 3, H, W)`` -> image embeddings ``(B, embed_dim)``, unnormalized."""
        return self.project_images(networks, pooled(networks["backbone"](images), self.options["pool"]))

    def text_features(self, networks: nn.ModuleDict, captions: Sequence[str],
                      step: StepContext | None = None) -> torch.Tensor:
        """``B`` captions -> the text tower's pooled features ``(B, text width)``, before the projection
        (tokenized on the CPU). With ``step``, the student's features of the same caption list are
        computed once per step and kept in ``step.memo``: CLIP's loss and annotation bootstrapping's
        psi_AB read the same pass (its gradient then sums both uses, as two passes would)."""
        text = networks["text"]

        def encode() -> torch.Tensor:
            return text.pooled_features(self.tokenize(captions, text.token_embedding.weight.device))

        if step is None or networks is not self.student:
            return encode()
        return step.remember("student_text_features", captions, encode)

    def encode_texts(self, networks: nn.ModuleDict, captions: Sequence[str],
                     step: StepContext | None = None) -> torch.Tensor:
        """``B`` captions -> text embeddings ``(B, embed_dim)``, unnormalized (see :meth:`text_features`)."""
        return networks["text"].projection(self.text_features(networks, captions, step))

    def contrastive(self, features: Sequence[torch.Tensor], captions: Sequence[str],
                    step: StepContext | None = None) -> tuple[torch.Tensor, dict]:
        """CLIP loss of the student for one or more views of the same images against their captions.

        ``features``: pooled backbone features ``(B, width)`` of each view. Each view is contrasted with
        the captions over the global batch; the loss is the mean over views. Returns (loss, metrics),
        the metrics measured on the first view."""
        if not any(captions):
            raise DataError(f"method {self.name} got a batch without captions; {self._give_captions()}")
        text = self.encode_texts(self.student, captions, step)
        scale = self.student["logit_scale"]()
        images = [self.project_images(self.student, f) for f in features]
        loss = torch.stack([clip_loss(image, text, scale) for image in images]).mean()
        return loss, {"clip_acc": clip_accuracy(images[0], text), "logit_scale": scale.detach(),
                      "embedding_std": normalized_embedding_std(images[0])}

    # -- training and annotation bootstrapping --------------------------------------------------------
    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]  # annotation bootstrapping passes its annotation stream under this name
        (view,) = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        features = pooled(self.student["backbone"](view.images), self.options["pool"])
        loss, metrics = self.contrastive([features], batch["caption"], step)
        return {"loss": loss, "metrics": metrics}

    def annotation_input(self) -> AnnotationInput:
        return AnnotationInput(feature_dim=self.student["text"].width)

    def annotation_features(self, networks: nn.ModuleDict, annotation_batch: dict,
                            step: StepContext | None = None) -> torch.Tensor:
        """The text tower's pooled features ``(K, text width)`` of the batch's captions, before CLIP's text
        projection (psi_AB's input, with gradient into the tower; with ``step``, the same pass as the
        CLIP loss's)."""
        return self.text_features(networks, annotation_batch["caption"], step)

    @torch.no_grad()
    def annotation_space(self, networks: nn.ModuleDict, images: torch.Tensor, annotation_batch: dict,
                         step: StepContext) -> AnnotationSpace:
        """p(caption | image) over the K captions of ``annotation_batch``: logits ``(M, K)`` =
        ``s * normalize(img) @ normalize(txt).T`` with the learned scale ``s`` of ``networks``."""
        image = self.encode_images(networks, images)
        text = self.encode_texts(networks, annotation_batch["caption"])
        # As in clip_loss: cosines times a scale near 100 need fp32, not bf16.
        with torch.autocast(device_type=images.device.type, enabled=False):
            image = F.normalize(image.float(), dim=-1)
            text = F.normalize(text.float(), dim=-1)
            return AnnotationSpace(networks["logit_scale"]().float() * image @ text.T)
