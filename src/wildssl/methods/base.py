"""The method interface every training method implements, and what the engine guarantees it.

A method is an ``nn.Module`` holding ``student`` (an ``nn.ModuleDict`` with at least ``"backbone"``)
and, where it distils from an EMA, ``teacher`` (an ``nn.ModuleDict`` of EMA copies of some student
modules, made by :meth:`Method.make_teacher`). The engine owns everything else: devices, DDP,
precision, the optimizer, schedules, checkpoints, logging.

One training step, as the engine runs it:

1. ``method.begin_step()``, then ``method(batches, step)``: ``batches`` maps each of the method's ``streams`` (``("train",)`` by
   default; annotation bootstrapping uses ``("annotation", "bootstrap")``) to its collated uint8 batch
   on the device, and ``step`` is a :class:`StepContext`. The method builds its views on the device
   with ``step.generator`` (seeded by the step, so resume is exact), runs its networks and returns
   ``{"loss": scalar tensor, "metrics": {name: scalar tensor or float}}``. It changes no state here
   except through *pending* updates (below) and the buffers of modules in training mode (BatchNorm
   running statistics), which ``begin_step`` remembers.
2. If the loss and the gradient norm are finite: the optimizer steps, then :meth:`Method.commit_step`
   (pending state is applied: DINO's center moves, learned logit scales are clamped), then
   :meth:`Method.update_teacher`. Otherwise nothing moves: the optimizer does not step and
   :meth:`Method.discard_step` drops the pending state and restores the remembered buffers.
3. After the last step of every epoch, :meth:`Method.on_epoch_end`; the metrics it returns are logged
   (``metrics.jsonl``, at that step) and checked by the collapse monitor.

Pending state: any submodule with a ``commit_step()`` method (and optionally ``discard_step()``) takes
part in 2, so a center, queue or cache written during ``forward`` only changes after a finite step.

Teachers: a teacher is always in eval mode (no drop path, no dropout, BatchNorm on running statistics
that follow the student's by EMA), whatever mode the method is put in, so targets carry no
stochasticity beyond the views.

How the methods map onto this interface:

| method | views (``wildssl.data.views``) | backbone call | teacher | loss |
|---|---|---|---|---|
| SimCLR | 2 x ``simclr`` crops | ``forward`` -> cls | - | ``losses.nt_xent`` |
| DINO | ``dino_specs`` (2 global + n local) | ``forward`` -> cls | EMA | :class:`~wildssl.methods.distillation.SelfDistillation` |
| CLIP/SLIP/SiLC | 1 view (+2 SimCLR / DINO views) | ``forward`` + text tower | SiLC: EMA | ``losses.clip_loss`` |
| iBOT | ``dino_specs``; masks on the global crops | ``forward(mask=)`` -> cls + patches | EMA | ``SelfDistillation`` x 2 + ``losses.patch_loss`` |
| SlotMIM | 2 overlapping crops (``data.overlap``) + masks | ``forward(mask=)`` -> patches | EMA | ``losses.patch_loss`` + ``losses.slot_loss`` |
| AB_* | base views + n crops per bootstrap image | base + box-query decoder | EMA | ``annotation_space`` of the base |
| SimSiam | 2 x ``simsiam`` crops | ``forward`` -> cls | - | ``losses.simsiam_loss`` |
| AdaSim / +NN / oracle | the base's, second view from a partner image | the base's | the base's | the base's |

Methods that learn p(annotation | image) expose :meth:`Method.annotation_space` (the targets),
:meth:`Method.annotation_input` and :meth:`Method.annotation_features` (what psi_AB reads) so annotation
bootstrapping can wrap them without knowing which base it wraps.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wildssl.data.sampler import IndexHook
from wildssl.errors import CheckpointError, ConfigError
from wildssl.models.ema import ema_update_
from wildssl.io import read_header
from wildssl.models.loading import (POOLS, build_encoder_from_config, encoder_state_from_checkpoint,
                                    evaluated_network, load_state_strict, resolve_checkpoint)

log = logging.getLogger("wildssl")

EVAL_NETWORKS = ("teacher", "student")


class ScheduleValues(dict):
    """This step's entries of ``method.schedules()``; a name missing from them is a KeyError that says where the
    values come from (a StepContext built by hand had none, and DINO failed with a bare KeyError: 'teacher_temp')."""

    def __missing__(self, key: str):
        raise KeyError(f"step.values has no {key!r}: give StepContext(values=...) this step's entries of "
                       "method.schedules(total_steps, steps_per_epoch) (one array per name, indexed by the step)")


@dataclass
class StepContext:
    """What a method may read about the current step."""

    step: int
    total_steps: int
    generator: torch.Generator
    values: dict[str, float] = field(default_factory=dict)  # this step's entries of method.schedules()
    log: bool = True  # the engine logs this step: compute costly diagnostics (GPU syncs) only then
    # Values a step computes once and reads in two places (e.g. the student's caption features, read by
    # CLIP's loss and by annotation bootstrapping's psi_AB): filled and read by the method, new every step.
    memo: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = ScheduleValues(self.values)

    def remember(self, key: str, source: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per step for ``source`` (compared by identity), kept in :attr:`memo` under ``key``:
        the second reader of the same input gets the first one's value."""
        kept = self.memo.get(key)
        if kept is None or kept[0] is not source:
            kept = (source, make())
            self.memo[key] = kept
        return kept[1]


@dataclass
class AnnotationSpace:
    """A base method's distribution over a set of K annotations for M images: the targets of annotation
    bootstrapping. ``logits`` ``(M, K)``: p(l | image) = softmax(logits) row-wise, every temperature,
    scale and centering already applied; computed without gradient."""

    logits: torch.Tensor


@dataclass(frozen=True)
class AnnotationInput:
    """What annotation bootstrapping's own annotation head psi_AB reads (seed 000, Alg. 1), exactly one of:

    ``feature_dim``: the annotations are encoded by the student's annotation backbone, and
    :meth:`Method.annotation_features` gives their ``(K, feature_dim)`` features (with gradient);
    ``num_annotations``: the annotations are a fixed set of K (DINO's prototypes), which psi_AB embeds
    with a learned ``(K, D)`` matrix."""

    feature_dim: int | None = None
    num_annotations: int | None = None


class Method(nn.Module):
    """Base class: subclasses set ``name``, ``defaults`` (the ``method.*`` config keys) and implement
    :meth:`forward`. Call :meth:`make_teacher` to get an EMA teacher."""

    # True for a method that trains nothing of the encoder it evaluates (LiT's locked image tower): its k-NN can only
    # show what model.init_from loaded, and the quality alarm says so
    locks_encoder = False

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # Data streams, each configured as data.<stream>; the first defines the epoch and train.batch_size.
    streams: ClassVar[tuple[str, ...]] = ("train",)
    # Methods that feed masked images (iBOT, SlotMIM) train the encoder's mask token; for the others it
    # is frozen, so that DDP does not wait for a gradient that never comes.
    uses_mask_token: ClassVar[bool] = False
    # The network that evaluation reads by default ("teacher" or "student"). A method and its variants
    # (AB_X of X) share it, so that a comparison evaluates the same network.
    eval_network: ClassVar[str] = "student"
    # Student modules that never train (LiT's image tower): frozen, and kept in eval mode.
    frozen_modules: ClassVar[tuple[str, ...]] = ()
    # DDP copies rank 0's buffers to every rank before each forward (BatchNorm statistics). A method whose
    # buffers are identical on every rank by construction, and large (AdaSim's latent cache, N x d), turns
    # that copy off.
    broadcast_buffers: ClassVar[bool] = True
    # The fewest images of train.batch_size one step needs, whether per rank (True) or in all ranks together
    # (False), and why: checked when the method is built, so that a batch of one is an error, not a loss of 0.
    min_batch: ClassVar[tuple[int, bool, str] | None] = None

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.options = config["method"]
        self._check_min_batch(config["train"]["batch_size"])
        if self.min_batch is not None:  # forward called directly (not by the engine) with too few images
            self.register_forward_pre_hook(_check_step_batch)
        self.student = nn.ModuleDict({"backbone": build_encoder_from_config(config["model"])})
        self.student["backbone"].mask_token.requires_grad_(self.uses_mask_token)
        self.teacher: nn.ModuleDict | None = None

    def _check_min_batch(self, batch_size: int, rule: tuple[int, bool, str] | None = None) -> None:
        """Refuse a ``train.batch_size`` under ``rule`` (:attr:`min_batch`'s form; by default the class's
        own), for a rule that depends on an option (Sinkhorn-Knopp centering)."""
        rule = self.min_batch if rule is None else rule
        if rule is None:
            return
        from wildssl.distributed import get_world_size

        fewest, per_rank, why = rule
        world = get_world_size()
        images = batch_size // world if per_rank else batch_size
        if images < fewest:
            where = f"{images} image(s) per rank of the {world}" if per_rank else f"{images} image(s)"
            raise ConfigError(f"method {self.name} {why}, and train.batch_size={batch_size} gives a step {where}: "
                              f"raise train.batch_size to {fewest * world if per_rank else fewest} or more")

    # -- teacher -----------------------------------------------------------------------------------
    def make_teacher(self, keys: Sequence[str] | None = None) -> None:
        """Create the EMA teacher: frozen copies of the student modules ``keys`` (all by default), with
        the same names and initial weights, in eval mode. I-JEPA, for one, copies the backbone only."""
        keys = list(self.student.keys()) if keys is None else list(keys)
        missing = [k for k in keys if k not in self.student]
        if missing:
            raise ValueError(f"make_teacher: the student has no module {missing[0]!r} (has {list(self.student)})")
        self.teacher = nn.ModuleDict({k: copy.deepcopy(self.student[k]) for k in keys})
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.teacher.eval()

    def init_encoder_from(self, path) -> None:
        """``model.init_from``: load the student backbone (and the teacher's copy of it, where there is
        one) strictly from a run directory, checkpoint or export (MAE -> WSP).

        The encoder taken is the one every evaluation and ``export`` take from ``path`` (the network the run
        evaluates: DINO's EMA teacher, SimCLR's student; an export's one encoder), so a run and its export
        initialize alike. Only the encoder is taken: whatever else the checkpoint holds (a decoder, heads, the
        optimizer) is left out, and so is the mask token when this method does not mask (a ``--timm`` export
        has none: this run keeps its own). One line reports what was loaded, from which network, and what was
        dropped (:func:`init_report`)."""
        state, model_config = encoder_state_from_checkpoint(path)
        backbone = self.student["backbone"]
        _check_same_architecture(path, model_config, backbone)
        kept = []
        if not self.uses_mask_token or "mask_token" not in state:
            state = {**state, "mask_token": backbone.state_dict()["mask_token"]}
            kept.append("mask_token")
        load_state_strict(backbone, state, str(path))
        if self.teacher is not None and "backbone" in self.teacher:
            self.teacher["backbone"].load_state_dict(backbone.state_dict())
        log.info(init_report(path, state, kept, teacher=self.teacher is not None and "backbone" in self.teacher))

    def train(self, mode: bool = True) -> "Method":
        """Set the training mode of the student; the teacher and the frozen modules stay in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        for key in self.frozen_modules:
            self.student[key].eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        if self.teacher is not None:
            ema_update_(self.teacher, self.student, momentum)

    # -- state that changes only after a finite step -----------------------------------------------
    def begin_step(self) -> None:
        """Called by the engine before ``forward``: remembers the buffers that a forward pass in training
        mode updates (BatchNorm running statistics; small), so that :meth:`discard_step` can put them
        back. Any other state belongs in a pending update (``commit_step``), never in ``forward``."""
        self._buffers_before_step = [(buffer, buffer.detach().clone()) for module in self.modules()
                                     if isinstance(module, nn.modules.batchnorm._NormBase) and module.training
                                     for buffer in module.buffers(recurse=False)]

    def commit_step(self) -> None:
        """Apply every pending state update (called by the engine after a finite optimizer step)."""
        for module in self.modules():
            if module is not self and hasattr(module, "commit_step"):
                module.commit_step()

    def discard_step(self) -> None:
        """Drop every pending state update and restore the buffers a forward pass changed (called by the
        engine instead of stepping)."""
        with torch.no_grad():
            for buffer, saved in getattr(self, "_buffers_before_step", ()):
                buffer.copy_(saved)
        self._buffers_before_step = []
        for module in self.modules():
            if module is not self and hasattr(module, "discard_step"):
                module.discard_step()

    def on_epoch_end(self, epoch: int) -> dict[str, float] | None:
        """Called by the engine on every rank after the last step of epoch ``epoch`` (0-based); returns the
        epoch's diagnostics to log (the same on every rank), or None. Default: nothing."""
        return None

    # -- what the engine asks of the method ----------------------------------------------------------
    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Extra per-iteration schedules the method reads from ``StepContext.values``."""
        return {}

    def schedule_warnings(self, total_steps: int, steps_per_epoch: int) -> list[str]:
        """What the method's own keys cannot do in a run of this length (the engine logs each line once at the
        start, beside its warnings about the learning-rate schedule); none by default."""
        return []

    def index_hook(self, stream: str) -> IndexHook | None:
        """A function that chooses the dataset indices a step of ``stream`` reads (see
        :data:`wildssl.data.sampler.IndexHook`), or None to read the sampler's batch as it is. The engine
        starts a new loader each epoch for a stream with a hook, so that the hook sees the state of the
        step's own epoch."""
        return None

    @property
    def may_leave_parameters_unused(self) -> bool:
        """True when some trainable parameters can get no gradient in a step (an ablation that switches
        a loss off): DDP must then look for them (``find_unused_parameters``), which costs a graph walk."""
        return False

    def encoder(self, teacher: bool | None = None) -> nn.Module:
        """The backbone to evaluate: :attr:`eval_network` by default (``teacher=None``)."""
        if teacher is None:
            teacher = self.eval_network == "teacher"
        if teacher and self.teacher is None:
            raise ValueError(f"method {self.name} has no teacher encoder")
        return (self.teacher if teacher else self.student)["backbone"]

    def prepare(self, sources: dict, run_dir) -> None:
        """Called by the engine once the data sources exist, before the checkpoint of a resumed run is
        loaded and before DDP wraps the method (e.g. CLIP trains or loads its caption tokenizer here, saved
        in ``run_dir``; AdaSim sizes its per-image state by the source). Default: nothing."""

    def check_data(self, sources: dict) -> None:
        """Refuse data the method cannot learn from (a DataError naming it; ``sources``: ``{stream: source}``).
        A method calls it from :meth:`prepare`; ``wildssl benchmark`` calls it for every entry before any run
        trains. Default: nothing."""

    def stream_batch_size(self, stream: str, first_batch_size: int) -> int:
        """Global batch of a stream after the first when ``data.<stream>_batch_size`` is null."""
        return first_batch_size

    def parameter_groups(self) -> list[dict]:
        """AdamW parameter groups of the trainable parameters, declared by the modules themselves.

        Each group has ``params``, ``wd_scale`` (0 for biases, norms, every parameter with ``ndim <= 1``
        and the names a module lists in its ``no_weight_decay()``), ``lr_scale`` (layer-wise decay
        ``optim.layer_decay ** (depth + 1 - layer)`` on the student backbone, from its ``layer_index``;
        1 elsewhere) and ``is_last_layer`` (the parameters a module lists in its ``last_layer_names()``,
        DINO's prototypes, which the engine freezes for the first ``optim.freeze_last_layer_epochs``).
        """
        no_decay: set[str] = set()
        last_layer: set[str] = set()
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            if hasattr(module, "no_weight_decay"):
                no_decay.update(dot + name for name in module.no_weight_decay())
            if hasattr(module, "last_layer_names"):
                last_layer.update(dot + name for name in module.last_layer_names())
        layer_decay = float(self.config["optim"].get("layer_decay", 1.0))
        backbone = self.student["backbone"]
        groups: dict[tuple[float, float, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = param.ndim > 1 and name not in no_decay
            lr_scale = 1.0
            if layer_decay != 1.0 and name.startswith("student.backbone."):
                layer = backbone.layer_index(name[len("student.backbone."):])
                lr_scale = layer_decay ** (backbone.depth + 1 - layer)
            key = (1.0 if decay else 0.0, lr_scale, name in last_layer)
            groups.setdefault(key, []).append(param)
        return [{"params": params, "wd_scale": wd_scale, "lr_scale": lr_scale, "is_last_layer": is_last,
                 "weight_decay": 0.0} for (wd_scale, lr_scale, is_last), params in sorted(groups.items())]

    def freeze_modules(self) -> None:
        """Stop gradients into :attr:`frozen_modules` (called at construction by methods that set them)."""
        for key in self.frozen_modules:
            for param in self.student[key].parameters():
                param.requires_grad_(False)

    # -- annotation bootstrapping ------------------------------------------------------------------
    def annotation_input(self) -> AnnotationInput:
        """What annotation bootstrapping's psi_AB reads for this base method (see :class:`AnnotationInput`)."""
        raise NotImplementedError(f"method {self.name} does not expose an annotation space")

    def annotation_features(self, networks: nn.ModuleDict, annotation_batch: dict,
                            step: StepContext | None = None) -> torch.Tensor:
        """``(K, feature_dim)`` features of the K annotations of ``annotation_batch`` from the annotation
        backbone of ``networks`` (the student), *with* gradient: psi_AB's input. Only for bases whose
        :meth:`annotation_input` has a ``feature_dim``; the order of the K annotations is that of
        :meth:`annotation_space`. With ``step``, a base may share them with its own loss through
        ``step.memo`` (CLIP: one text-tower pass per step, not two)."""
        raise NotImplementedError(f"method {self.name} has no annotation features")

    def annotation_space(self, networks: nn.ModuleDict, images: torch.Tensor, annotation_batch: dict,
                         step: StepContext) -> AnnotationSpace:
        """p(annotation | image) of ``images`` ``(M, 3, h, w)`` (normalized) computed with ``networks``
        (the EMA teacher, or the student for the no-EMA ablation) without gradient, over annotations drawn
        from ``annotation_batch`` (captions for CLIP, other images' views for SimCLR) or fixed (DINO's
        prototypes). Implemented by the methods annotation bootstrapping can wrap."""
        raise NotImplementedError(f"method {self.name} does not expose an annotation space")

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:  # pragma: no cover
        raise NotImplementedError


def _check_step_batch(method: "Method", inputs: tuple) -> None:
    """Forward pre-hook of a method with :attr:`Method.min_batch`: the images of the first stream's batch, as
    :meth:`Method._check_min_batch` checks ``train.batch_size`` (SimCLR given one image returned a loss of 0)."""
    from wildssl.distributed import get_world_size

    batch = inputs[0].get(method.streams[0]) if inputs and isinstance(inputs[0], dict) else None
    if not isinstance(batch, dict) or "image" not in batch:
        return
    fewest, per_rank, why = method.min_batch
    images = len(batch["image"])
    if (images if per_rank else images * get_world_size()) < fewest:
        raise ConfigError(f"method {method.name} {why}, and this step's batch holds {images} image(s)"
                          f"{' on this rank' if per_rank else ''}: give it {fewest} or more")


def init_report(path, state: dict[str, torch.Tensor], kept: Sequence[str], teacher: bool) -> str:
    """The one line ``model.init_from`` logs: the encoder tensors loaded (count, values) and, by part, the
    tensors of the file that were dropped (``student.decoder``, ``optimizer``, ...; an export holds none)
    plus the encoder tensors this run keeps its own of (``kept``, the mask token of a method that does not
    mask)."""
    _, shapes = read_header(resolve_checkpoint(path))
    network = evaluated_network(path)  # "teacher", "student" or "export": what encoder_state_from_checkpoint read
    source = f"method.{network}.backbone"
    dropped: Counter[str] = Counter()
    for key in shapes:
        if key.startswith("method."):
            part = ".".join(key.split(".")[1:3])
            if part != f"{network}.backbone":
                dropped[part] += 1
        elif key not in state:  # an export holds the encoder's own names only
            dropped[key.split(".")[0]] += 1
    loaded = [k for k in state if k not in kept]
    values = sum(state[k].numel() for k in loaded)
    parts = [f"{name} ({count} tensors)" for name, count in sorted(dropped.items())]
    parts += [f"{name} (this run keeps its own)" for name in kept]
    into = "the student backbone" + (" and the teacher's copy" if teacher else "")
    taken = "its one encoder" if network == "export" else f"the run's {network} ({source})"
    return (f"model.init_from {path}: loaded {len(loaded)} encoder tensors ({values / 1e6:.2f}M values) of {taken} "
            f"into {into}; dropped: {', '.join(parts) if parts else 'nothing'}")


def normalized_embedding_std(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of l2-normalized ``(B, D)`` embeddings, times sqrt(D).

    About 1 for embeddings spread over the sphere, 0 when they all coincide (collapse)."""
    z = F.normalize(embeddings.detach().float(), dim=-1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[-1])


def check_pool(pool: str, where: str = "method.pool") -> str:
    """``pool`` if it is one of :data:`POOLS`, else a one-line ConfigError naming ``where``."""
    if pool not in POOLS:
        raise ConfigError(f"{where}={pool!r} is not one of {', '.join(POOLS)}")
    return pool


def pooled(output: dict, pool: str) -> torch.Tensor:
    """The image representation from the encoder's output dict: the cls token (``"cls"``) or the mean
    of the patch tokens (``"avg"``); anything else is a ConfigError."""
    if pool == "cls":
        return output["cls"]
    if pool == "avg":
        return output["patch"].mean(dim=1)
    raise ConfigError(f"pool={pool!r} is not one of {', '.join(POOLS)}")


def _check_same_architecture(path, model_config: dict, backbone: nn.Module) -> None:
    """A CheckpointError naming the ``model.*`` keys to set when ``model.init_from``'s encoder is of another
    architecture than this run's (a strict load would name only the first tensor whose shape differs, e.g. the
    position table when the patch size differs)."""
    from wildssl.models.peers import vit_architecture

    with torch.device("meta"):
        source = vit_architecture(build_encoder_from_config(model_config))
    here = vit_architecture(backbone)
    differ = [key for key in here if source.get(key) != here[key]]
    if differ:
        keys = " ".join(f"--set model.{key}={source[key]}" for key in differ if key in ("img_size", "patch_size",
                                                                                     "embed_dim", "depth", "num_heads",
                                                                                     "num_register_tokens"))
        raise CheckpointError(f"model.init_from={path} holds an encoder with "
                              f"{', '.join(f'{k} {source[k]}' for k in differ)}, this run's model has "
                              f"{', '.join(f'{k} {here[k]}' for k in differ)}; give the run that encoder's "
                              f"architecture{(' (' + keys + ')') if keys else ''}")


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
