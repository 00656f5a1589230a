"""The method interface every training method implements, and what the engine guarantees it.

A method is an ``nn.Module`` holding ``student`` (an ``nn.ModuleDict`` with at least ``"backbone"``)
and, where it distils from an EMA, ``teacher`` (same keys, no gradients). The engine owns everything
else: devices, DDP, precision, the optimizer, schedules, checkpoints, logging.

Per step the engine calls ``method(batches, step)`` where ``batches`` maps each of the method's
``streams`` (``("train",)`` by default; annotation bootstrapping uses ``("annotation", "bootstrap")``) to
its collated uint8 batch on the device, and ``step`` is a :class:`StepContext`; the method builds its views on the device with
``step.generator`` (seeded by the step, so resume is exact), runs its networks and returns
``{"loss": scalar tensor, "metrics": {name: scalar tensor or float}}``. After the optimizer step the
engine calls ``update_teacher(momentum)``.

How the roadmap's methods map onto this interface (the hooks they need exist now):

| method | views (``wildssl.data.views``) | backbone call | teacher | loss |
|---|---|---|---|---|
| SimCLR | 2 x ``simclr_specs`` | ``forward`` -> cls | - | ``losses.nt_xent`` |
| DINO | ``dino_specs`` (2 global + n local) | ``forward`` -> cls | EMA | ``losses.dino_loss`` |
| CLIP/SLIP/SiLC | 1 view (+2 SimCLR / DINO views) | ``forward`` + text tower | SiLC: EMA | ``losses.clip_loss`` |
| MAE / I-JEPA | 1 view | ``forward(keep_indices=...)`` | I-JEPA: EMA | pixels / patch embeddings |
| iBOT / SlotMIM | 2 global (+ local) | ``forward(mask=...)`` | EMA | patch + cls prototypes |
| AdaSim | as DINO/SimSiam + neighbour index | ``forward`` | EMA | DINO/SimSiam on sampled pairs |
| AB_* | base views + n crops per bootstrap image | base + box-query decoder | EMA | ``annotation_space`` of the base |

Methods that learn p(annotation | image) expose :meth:`Method.annotation_space` so annotation
bootstrapping can wrap them without knowing which base it wraps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wildssl.train.checkpoint import build_encoder_from_config
from wildssl.train.ema import ema_update_


@dataclass
class StepContext:
    """What a method may read about the current step."""

    step: int
    total_steps: int
    generator: torch.Generator
    values: dict[str, float] = field(default_factory=dict)  # this step's entries of method.schedules()
    log: bool = True  # the engine logs this step: compute costly diagnostics (GPU syncs) only then


@dataclass
class AnnotationSpace:
    """A base method's distribution over a set of K annotations for M images (annotation bootstrapping).

    ``logits`` ``(M, K)``: p(l | image) = softmax(logits) row-wise, every temperature, scale and centering
    already applied. ``annotations`` ``(K, D_a)``: the annotation embeddings psi(l) that the bootstrap head
    maps into its own space (detached: the bootstrap loss does not train the base method's heads).
    """

    logits: torch.Tensor
    annotations: torch.Tensor


class Method(nn.Module):
    """Base class: subclasses set ``name``, ``defaults`` (the ``method.*`` config keys) and implement
    :meth:`forward`. Set ``self.teacher`` to an ``nn.ModuleDict`` to get EMA updates."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # Data streams, each configured as data.<stream>; the first defines the epoch and train.batch_size.
    streams: ClassVar[tuple[str, ...]] = ("train",)
    # Methods that feed masked images (iBOT, SlotMIM) train the encoder's mask token; for the others it
    # is frozen, so that DDP does not wait for a gradient that never comes.
    uses_mask_token: ClassVar[bool] = False

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.options = config["method"]
        self.student = nn.ModuleDict({"backbone": build_encoder_from_config(config["model"])})
        self.student["backbone"].mask_token.requires_grad_(self.uses_mask_token)
        self.teacher: nn.ModuleDict | None = None

    # -- teacher -----------------------------------------------------------------------------------
    def make_teacher(self) -> None:
        """Create the EMA teacher as a frozen copy of the student (same keys, same initial weights)."""
        import copy

        self.teacher = copy.deepcopy(self.student)
        for param in self.teacher.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        if self.teacher is not None:
            ema_update_(self.teacher, self.student, momentum)

    # -- schedules and hooks -----------------------------------------------------------------------
    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Extra per-iteration schedules the method reads from ``StepContext.values``."""
        return {}

    def encoder(self, teacher: bool | None = None) -> nn.Module:
        """The backbone to evaluate: the teacher where there is one (``teacher=None``), else the student."""
        if teacher is None:
            teacher = self.teacher is not None
        if teacher and self.teacher is None:
            raise ValueError(f"method {self.name} has no teacher encoder")
        return (self.teacher if teacher else self.student)["backbone"]

    def prepare(self, sources: dict, run_dir) -> None:
        """Called by the engine once the data sources exist and before training or resuming (e.g. CLIP
        trains or loads its caption tokenizer here, saved in ``run_dir``). Default: nothing."""

    def annotation_dim(self) -> int:
        """Width D_a of :attr:`AnnotationSpace.annotations` (for annotation bootstrapping's psi_AB)."""
        raise NotImplementedError(f"method {self.name} does not expose an annotation space")

    @torch.no_grad()
    def annotation_space(self, networks: nn.ModuleDict, images: torch.Tensor, annotation_batch: dict,
                         step: StepContext) -> AnnotationSpace:
        """p(annotation | image) of ``images`` ``(M, 3, h, w)`` (normalized) computed with ``networks``
        (the EMA teacher, or the student for the no-EMA ablation), over annotations drawn from
        ``annotation_batch`` (captions for CLIP, other images' views for SimCLR) or fixed (DINO's
        prototypes). Implemented by the methods annotation bootstrapping can wrap."""
        raise NotImplementedError(f"method {self.name} does not expose an annotation space")

    def stream_batch_size(self, stream: str, first_batch_size: int) -> int:
        """Global batch of a stream after the first when ``data.<stream>_batch_size`` is null."""
        return first_batch_size

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:  # pragma: no cover
        raise NotImplementedError


def normalized_embedding_std(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of l2-normalized ``(B, D)`` embeddings, times sqrt(D).

    About 1 for embeddings spread over the sphere, 0 when they all coincide (collapse)."""
    z = F.normalize(embeddings.detach().float(), dim=-1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[-1])


def pooled(output: dict, pool: str) -> torch.Tensor:
    """The image representation from the encoder's output dict: cls token or mean of patch tokens."""
    return output["cls"] if pool == "cls" else output["patch"].mean(dim=1)


def pooled_features(backbone: nn.Module, images: Sequence[torch.Tensor], pool: str) -> list[torch.Tensor]:
    """Pooled backbone features of several view batches: ``[(B_i, 3, h_i, w_i)] -> [(B_i, width)]``.

    Consecutive batches of one resolution go through the backbone together (fewer, larger calls);
    the ViT has no batch statistics, so this changes nothing but speed.
    """
    features: list[torch.Tensor] = []
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and images[end].shape[-2:] == images[start].shape[-2:]:
            end += 1
        group = pooled(backbone(torch.cat(list(images[start:end]))), pool)
        features.extend(group.split([x.shape[0] for x in images[start:end]]))
        start = end
    return features
