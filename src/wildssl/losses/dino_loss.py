"""DINO self-distillation loss (Caron et al. 2021, Eq. 2-3) with teacher centering and sharpening.

The teacher's output is centered (a running mean of its logits is subtracted) and sharpened (a low
temperature); the student is trained to match it across crops. Centering alone collapses to a uniform
output and sharpening alone to a one-hot one; together they balance (the paper's collapse study).
Collapse is visible in :func:`entropy`: teacher entropy near 0, or the loss stuck near ``ln K``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.errors import ConfigError
from wildssl.distributed import all_reduce_max, all_reduce_mean, get_world_size


def dino_cross_entropy(
    student_logits: Sequence[torch.Tensor],
    teacher_probs: Sequence[torch.Tensor],
    student_temp: float = 0.1,
    skip_same_view: bool = True,
) -> torch.Tensor:
    """Cross-entropy between teacher and student crops, averaged over crop pairs and the batch (Eq. 2-3).

    ``student_logits``: list of ``(B, K)`` logits, one per student crop; the first ``len(teacher_probs)``
    must be the same global views the teacher saw, in the same order. ``teacher_probs``: list of
    ``(B, K)`` probabilities from :func:`teacher_probabilities`. The loss is::

        L = mean over pairs (i, j) and batch of  -sum_k P_t^i[k] * log softmax(s^j / student_temp)[k]

    over every teacher crop ``i`` and student crop ``j``, skipping ``i == j`` when ``skip_same_view``
    (a view is not asked to predict itself). Returns a scalar, computed in float32.
    """
    if not teacher_probs or not student_logits:
        raise ValueError("dino_cross_entropy needs at least one teacher and one student crop")
    if skip_same_view and len(student_logits) < len(teacher_probs):
        raise ValueError(
            f"dino_cross_entropy with skip_same_view needs the {len(teacher_probs)} teacher views among the "
            f"student crops, got only {len(student_logits)} student crops"
        )
    shape = teacher_probs[0].shape
    for crop in (*student_logits, *teacher_probs):
        if crop.ndim != 2 or crop.shape != shape:
            raise ValueError(
                f"dino_cross_entropy needs every crop of shape (B, K) = {tuple(shape)}, got {tuple(crop.shape)}"
            )
    if not student_temp > 0:  # NaN too
        raise ValueError(f"dino_cross_entropy student_temp must be > 0, got {student_temp}")

    student_log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total = student_log_probs[0].new_zeros(())
    num_pairs = 0
    for i, p_t in enumerate(teacher_probs):
        p_t = p_t.float()
        for j, log_p_s in enumerate(student_log_probs):
            if skip_same_view and i == j:
                continue
            total = total + torch.sum(-p_t * log_p_s, dim=-1).mean()
            num_pairs += 1
    if num_pairs == 0:
        raise ValueError("dino_cross_entropy has no (teacher, student) pair left after skipping same views")
    return total / num_pairs


def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Centered, sharpened teacher targets ``softmax((t - c) / teacher_temp)``, without gradient.

    ``teacher_logits``: ``(..., K)``; ``center``: ``(1, K)`` or ``(K,)`` (see :class:`DINOCenter`).
    Returns float32 probabilities of the shape of ``teacher_logits``, detached: the teacher is a
    stop-gradient target in DINO.
    """
    if not teacher_temp > 0:  # NaN too
        raise ValueError(f"teacher_probabilities teacher_temp must be > 0, got {teacher_temp}")
    return F.softmax((teacher_logits.detach().float() - center.float()) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp_probabilities(teacher_logits: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's centering of the teacher (Oquab et al. 2023, from SwAV): ``softmax(t / teacher_temp)``
    rescaled by ``iterations`` Sinkhorn-Knopp steps so that, over the batch of every rank, each of the K
    prototypes gets an equal share of the mass, and each crop's row is a distribution (sums to 1).

    ``teacher_logits`` ``(N, K)``. Returns fp32 ``(N, K)`` probabilities, no gradient. Each step first
    scales the prototypes' totals to ``1 / K``, then every crop's total to ``1 / N_all`` (all ranks' crops;
    every rank must pass the same ``N``), and the result is multiplied by ``N_all``. The logits are
    shifted by their maximum over all ranks before ``exp``: a common factor, which the first scaling removes,
    as it removes DINOv2's initial division by the total mass (left out here: one collective fewer).
    """
    if not teacher_temp > 0 or iterations < 1:
        raise ValueError(f"sinkhorn_knopp_probabilities needs teacher_temp > 0 and iterations >= 1, "
                         f"got {teacher_temp}, {iterations}")
    logits = teacher_logits.detach().float()
    world = get_world_size()
    q = torch.exp((logits - all_reduce_max(logits.max())) / teacher_temp).t()  # (K, N)
    prototypes, crops = q.shape[0], q.shape[1] * world
    for _ in range(iterations):
        q = q / (all_reduce_mean(q.sum(dim=1, keepdim=True)) * world) / prototypes
        q = q / q.sum(dim=0, keepdim=True) / crops
    return (q * crops).t()


class DINOCenter(nn.Module):
    """Running mean of the teacher's logits (the "center" ``c`` of DINO, Eq. 4 of the paper).

    The center is a buffer, so it follows ``.to(device)`` and is saved in checkpoints with the method.
    It moves only after a finite step: :meth:`observe` records this step's batch mean, and the engine
    applies it with :meth:`commit_step` after the optimizer step, or drops it with :meth:`discard_step`
    when the step is skipped, so one non-finite step cannot poison the center.
    """

    center: torch.Tensor

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, num_prototypes))
        self.momentum = momentum
        self.pending_sum: torch.Tensor | None = None
        self.pending_count = 0

    @torch.no_grad()
    def observe(self, teacher_logits: torch.Tensor) -> None:
        """Record the batch mean of ``teacher_logits`` ``(N, K)`` (every teacher crop of this rank's
        batch stacked), averaged over ranks (ranks hold equal ``N``) so every rank keeps the same center.
        Several calls in one step are averaged."""
        if teacher_logits.ndim != 2 or teacher_logits.shape[1] != self.center.shape[1]:
            raise ValueError(
                f"DINOCenter.observe needs teacher logits of shape (N, {self.center.shape[1]}), "
                f"got {tuple(teacher_logits.shape)}"
            )
        batch_mean = all_reduce_mean(teacher_logits.float().mean(dim=0, keepdim=True))
        self.pending_sum = batch_mean if self.pending_sum is None else self.pending_sum + batch_mean
        self.pending_count += 1

    @torch.no_grad()
    def commit_step(self) -> None:
        """``c <- momentum * c + (1 - momentum) * batch mean`` with the mean :meth:`observe` recorded."""
        if self.pending_sum is not None:
            batch_mean = (self.pending_sum / self.pending_count).to(self.center.dtype)
            self.center.mul_(self.momentum).add_(batch_mean, alpha=1.0 - self.momentum)
        self.discard_step()

    def discard_step(self) -> None:
        self.pending_sum, self.pending_count = None, 0


def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_steps: int, total_steps: int
) -> torch.Tensor:
    """Teacher temperature for every training step: linear warm-up, then constant (as in DINO).

    Returns a float64 tensor of shape ``(total_steps,)`` with ``schedule[0] = warmup_teacher_temp``,
    ``schedule[warmup_steps - 1] = teacher_temp`` (for ``warmup_steps >= 2``) and ``teacher_temp`` on
    every later step. Indexed by iteration, like every wildssl schedule.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ConfigError(
            f"teacher temperature warm-up of {warmup_steps} steps does not fit in {total_steps} training steps; "
            "use 0 <= warm-up steps <= total steps"
        )
    if not (warmup_teacher_temp > 0 and teacher_temp > 0):
        raise ConfigError(
            f"teacher temperatures must be > 0, got warm-up {warmup_teacher_temp} and final {teacher_temp}"
        )
    warmup = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_steps, dtype=torch.float64)
    constant = torch.full((total_steps - warmup_steps,), teacher_temp, dtype=torch.float64)
    return torch.cat([warmup, constant])


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each distribution: ``(..., K) -> (...)``, with ``0 log 0 = 0``.

    Between 0 (one-hot: collapse onto one prototype) and ``ln K`` (uniform: collapse onto the center).
    """
    return -torch.special.xlogy(probs, probs).sum(dim=-1)
