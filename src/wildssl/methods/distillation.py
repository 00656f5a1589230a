"""Self-distillation over K prototypes (DINO, Caron et al. 2021): one component that DINO, SiLC, iBOT,
SlotMIM and AdaSim compose.

The pieces, in the order of a step:

- heads: :meth:`SelfDistillation.build_head` makes the student's :class:`~wildssl.models.heads.DINOHead`;
  the method puts it in ``student[key]`` and its teacher gets the EMA copy by name;
- targets: :meth:`SelfDistillation.targets` centers and sharpens the teacher's logits
  (``softmax((t - c) / teacher_temp)``) and records the batch mean for the center, which moves only
  after a finite step (:class:`~wildssl.losses.dino_loss.DINOCenter`);
- loss: :meth:`SelfDistillation.loss` is the cross-entropy of every student crop against every teacher
  crop but its own (Eq. 2-3), in fp32;
- temperature: :func:`teacher_temp_schedule` warms the teacher temperature up per iteration.

The multi-crop views of DINO and iBOT come from :func:`multi_crop_specs` (the keys of
:data:`MULTI_CROP_VIEW_DEFAULTS`).

Its option keys (``DISTILLATION_DEFAULTS``) carry a prefix when a method needs two of them (iBOT's cls
and patch distillation: ``patch_out_dim``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from wildssl.data.photometric import PIPELINES
from wildssl.data.views import CropSpec, dino_specs
from wildssl.errors import ConfigError
from wildssl.losses.dino_loss import (DINOCenter, dino_cross_entropy, entropy, sinkhorn_knopp_probabilities,
                                      teacher_probabilities, teacher_temperature_schedule)
from wildssl.models.heads import DINOHead

# The head, temperatures and centering of DINO-style distillation: the released ViT-S/16 settings.
DISTILLATION_DEFAULTS = {
    "out_dim": 65536,
    "hidden_dim": 2048,
    "bottleneck_dim": 256,
    "head_layers": 3,
    "norm_last_layer": True,
    "student_temp": 0.1,
    "teacher_temp": 0.07,
    "warmup_teacher_temp": 0.04,
    "teacher_temp_warmup_epochs": 30.0,
    "center_momentum": 0.9,
    # "center" (DINO: subtract a running mean of the teacher's logits) or "sinkhorn" (DINOv2: three
    # Sinkhorn-Knopp steps spread each batch's mass evenly over the prototypes, with no running state).
    "centering": "center",
}
CENTERINGS = ("center", "sinkhorn")

# DINO's multi-crop (released ViT-S/16: 10 local crops, scales split at 0.25).
MULTI_CROP_DEFAULTS = {
    "global_size": 224,
    "local_size": 96,
    "n_local": 10,
    "global_scale": [0.25, 1.0],
    "local_scale": [0.05, 0.25],
}


# The keys :func:`multi_crop_specs` reads: the crops above and their colours (DINO, iBOT; SiLC's crops have none).
MULTI_CROP_VIEW_DEFAULTS = {**MULTI_CROP_DEFAULTS, "photometric": "dino"}


def multi_crop_specs(options: dict) -> list[CropSpec]:
    """DINO's multi-crop views from :data:`MULTI_CROP_VIEW_DEFAULTS`' keys; ``photometric``: ``dino`` (the paper's
    three colour pipelines: blur p = 1 / 0.1 + solarize / 0.5 on the first global, second global and local crops)
    or the name of one pipeline of :data:`wildssl.data.photometric.PIPELINES` for every crop (``simclr_cifar``:
    colour jitter and grayscale, no blur, for 32-px images); anything else is a one-line ConfigError."""
    photometric = options["photometric"]
    if photometric != "dino" and photometric not in PIPELINES:
        raise ConfigError(f"method.photometric={photometric!r} is not a photometric pipeline; choose dino "
                          f"(the paper's three) or one of {', '.join(sorted(PIPELINES))} for every crop")
    return dino_specs(options["global_size"], options["local_size"], options["n_local"],
                      global_scale=tuple(options["global_scale"]), local_scale=tuple(options["local_scale"]),
                      photometric=None if photometric == "dino" else photometric)


def teacher_temp_schedule(options: dict, total_steps: int, steps_per_epoch: int,
                          prefix: str = "") -> dict[str, np.ndarray]:
    """``{prefix + "teacher_temp": per-step values}``: linear warm-up, then constant (DINO's schedule)."""
    # A run shorter than the warm-up (a smoke test with train.steps=2) warms up over the whole run.
    warmup = min(int(round(options[prefix + "teacher_temp_warmup_epochs"] * steps_per_epoch)), total_steps)
    values = teacher_temperature_schedule(options[prefix + "warmup_teacher_temp"], options[prefix + "teacher_temp"],
                                          warmup, total_steps)
    return {prefix + "teacher_temp": np.asarray(values, dtype=np.float64)}


class SelfDistillation(nn.Module):
    """DINO-style distillation state and maths for one set of prototypes (see the module docstring).

    ``options``: the method's options holding the :data:`DISTILLATION_DEFAULTS` keys, each with
    ``prefix``. The module holds the center (a buffer, saved with the method); the heads live in the
    method's student/teacher dicts so the EMA pairs them by name.
    """

    def __init__(self, options: dict, prefix: str = "") -> None:
        super().__init__()
        self.options, self.prefix = options, prefix
        self.out_dim = self.option("out_dim")
        self.center = DINOCenter(self.out_dim, self.option("center_momentum"))
        if self.option("centering") not in CENTERINGS:
            raise ConfigError(f"method.{self.prefix}centering={self.option('centering')!r} must be one of "
                              f"{', '.join(CENTERINGS)}")

    def option(self, key: str):
        return self.options[self.prefix + key]

    def min_batch(self) -> tuple[int, bool, str] | None:
        """The fewest images a step needs, in :attr:`Method.min_batch`'s form: Sinkhorn-Knopp centering spreads
        the teacher's targets over the images of the batch (all ranks together); with one image they come out
        near uniform (teacher entropy 5.23 against ln K = 5.55) and the run trains on them."""
        if self.option("centering") != "sinkhorn":
            return None
        return (2, False, f"with method.{self.prefix}centering=sinkhorn spreads the teacher's targets over the "
                          "images of the batch")

    def build_head(self, in_dim: int) -> DINOHead:
        return DINOHead(in_dim, self.out_dim, self.option("hidden_dim"), self.option("bottleneck_dim"),
                        self.option("head_layers"), self.option("norm_last_layer"))

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return teacher_temp_schedule(self.options, total_steps, steps_per_epoch, self.prefix)

    def teacher_temp(self, values: dict[str, float]) -> float:
        """This step's teacher temperature from ``StepContext.values``."""
        return values[self.prefix + "teacher_temp"]

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centered, sharpened teacher distributions of ``(N, K)`` logits (fp32, no gradient); records
        the batch mean so that the center moves after a finite step (with Sinkhorn-Knopp centering the
        center is kept too, for :meth:`centered_logits`, but the targets do not use it)."""
        teacher_logits = teacher_logits.float()
        if self.option("centering") == "sinkhorn":
            probs = sinkhorn_knopp_probabilities(teacher_logits, teacher_temp)
        else:
            probs = teacher_probabilities(teacher_logits, self.center.center, teacher_temp)
        self.center.observe(teacher_logits)
        return probs

    @torch.no_grad()
    def centered_logits(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``(t - c) / teacher_temp``: the logits of the teacher's distribution, without recording
        anything (annotation bootstrapping reads p(prototype | crop) from it)."""
        return (teacher_logits.float() - self.center.center) / teacher_temp

    def loss(self, student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every student crop ``(B, K)`` against every teacher crop but its own."""
        return dino_cross_entropy([s.float() for s in student_logits], teacher_probs, self.option("student_temp"))

    def metrics(self, teacher_probs: torch.Tensor, teacher_temp: float) -> dict:
        """Collapse diagnostics: teacher entropy (0 = one-hot collapse) and ln K (uniform collapse)."""
        return {"teacher_entropy": entropy(teacher_probs).mean(), "uniform_loss": math.log(self.out_dim),
                "teacher_temp": teacher_temp}
