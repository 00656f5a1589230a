"""Annotation-bootstrapping loss and its IoU-bucketed agreement diagnostic (seed 000, Eq. 5).

For a pair (source crop i, target crop j) the student predicts, from crop i and the box of crop j,
a distribution over the base method's annotations ``l_1..l_K``:

    q(l_k | x_i, box_ij) = softmax_k(t_AB * phi_AB(x_i, box_ij) . psi_AB(l_k))

and the EMA teacher's base distribution on crop j is the target:

    p(l_k | x_j) = softmax_k(teacher_logits_k / teacher_temp)

The loss is the cross-entropy ``H(p, q) = -sum_k p_k log q_k``, which equals ``KL(p || q)`` plus
the teacher's entropy ``H(p)``, a constant for the student, averaged over all valid pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bootstrap_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_temp: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy from the teacher's distribution to the student's, averaged over pairs.

    Args:
        student_logits: ``(..., K)`` student logits per pair, e.g. ``(B, P, K)``.
        teacher_logits: ``(..., K)`` teacher logits on each pair's target crop; detached here, the
            teacher only receives gradients through its EMA update.
        teacher_temp: temperature dividing the teacher logits (sharpening when below 1).
        valid: ``(...)`` bool mask of the pairs that count (the IoU-range ablation leaves out the
            pairs it found no target for); ``None`` = all.

    Returns a scalar. When no pair is valid it is a zero that still depends on the student logits,
    so the step runs (with zero gradient) instead of producing NaN.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape (..., K), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not teacher_temp > 0:  # 0 gave NaN, a negative one inverted the target, NaN went through
        raise ValueError(f"bootstrap_loss teacher_temp must be > 0, got {teacher_temp}")
    if valid is not None and valid.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"valid must have shape {tuple(student_logits.shape[:-1])} (one flag per pair), "
            f"got {tuple(valid.shape)}"
        )
    # bf16 logits under autocast lose too much in a softmax over large K; float64 stays float64.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    if valid is not None:
        # Select the pairs that count *before* any arithmetic: a non-finite value in a pair left out must
        # reach neither the loss nor the gradient (multiplying by a 0/1 mask gives NaN * 0 = NaN, and
        # even a selection after the softmax back-propagates NaN through the left-out rows).
        valid = valid.bool()
        student_logits, teacher_logits = student_logits[valid], teacher_logits[valid]
        if student_logits.shape[0] == 0:
            return student_logits.to(dtype).sum()  # an empty sum: zero, yet in the graph (the step runs, zero gradient)
    target = F.softmax(teacher_logits.detach().to(dtype) / teacher_temp, dim=-1)
    return -(target * F.log_softmax(student_logits.to(dtype), dim=-1)).sum(dim=-1).mean()


@torch.no_grad()
def bootstrap_agreement(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    iou: torch.Tensor,
    buckets: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 1.0001),
) -> dict[str, float]:
    """Bootstrap accuracy (student argmax == teacher argmax) per source/target IoU bucket.

    Args:
        student_logits, teacher_logits: ``(B, P, K)``.
        iou: ``(B, P)`` IoU of each pair's source and target boxes (from ``pack_pairs``).
        buckets: increasing edges; bucket ``k`` holds pairs with ``edges[k] <= iou < edges[k+1]``
            (the last edge is just above 1 so identical boxes count).

    Returns ``{"agreement": overall, "agreement_iou_0-0.1": ..., "agreement_iou_0.7-1": ...}``;
    buckets without pairs are left out rather than reported as NaN.
    """
    if iou.shape != student_logits.shape[:-1]:
        raise ValueError(f"iou must have shape {tuple(student_logits.shape[:-1])}, got {tuple(iou.shape)}")
    if any(lo >= hi for lo, hi in zip(buckets[:-1], buckets[1:])):
        raise ValueError(f"IoU bucket edges must be strictly increasing, got {buckets}")
    agree = (student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float()
    result = {"agreement": agree.mean().item()}
    for lo, hi in zip(buckets[:-1], buckets[1:]):
        in_bucket = (iou >= lo) & (iou < hi)
        count = int(in_bucket.sum())
        if count:
            result[f"agreement_iou_{lo:g}-{min(hi, 1.0):g}"] = (agree * in_bucket).sum().item() / count
    return result
