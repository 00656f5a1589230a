"""Patch-level self-distillation: the student's prototype distribution of a patch against the teacher's
(iBOT, Zhou et al. ICLR 2022, Eq. 1 and Alg. 1; SlotMIM, Wen et al. CVPR 2025).

For a patch with student logits ``s`` and teacher probabilities ``P_t`` (centered and sharpened, see
:func:`wildssl.losses.dino_loss.teacher_probabilities`), the per-patch loss is the cross-entropy::

    l = -sum_k P_t[k] log softmax(s / student_temp)[k]

The functions differ in which patches count and how they are averaged; all compute in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _patch_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                         student_temp: float) -> torch.Tensor:
    if not student_temp > 0:  # NaN too
        raise ValueError(f"patch cross-entropy student_temp must be > 0, got {student_temp}")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} differ in shape")
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_probs).sum(dim=-1)


def masked_patch_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor,
                               student_temp: float = 0.1) -> torch.Tensor:
    """iBOT's masked-image-modeling loss of one view: ``(B, N, K), (B, N, K), (B, N) bool -> ()``.

    The student saw the view with the ``mask``-ed patches replaced by the mask token, the teacher saw it
    whole. Per image, the mean of ``l`` over its masked patches; then the mean over the ``B`` images, an
    image without masked patches counting as 0 (iBOT's ``iBOTLoss``: ``sum(l * mask) / mask.sum().clamp(1)``
    per image, then ``.mean()``; with its default half of the images are left unmasked). Only the masked
    patches are read (a non-finite value elsewhere does not reach the loss):
    :func:`masked_rows_cross_entropy` of ``student_logits[mask]`` and ``teacher_probs[mask]``.
    """
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the patches {tuple(student_logits.shape[:2])}")
    return masked_rows_cross_entropy(student_logits[mask], teacher_probs[mask], mask, student_temp)


def masked_rows_cross_entropy(student_rows: torch.Tensor, teacher_rows: torch.Tensor, mask: torch.Tensor,
                              student_temp: float = 0.1) -> torch.Tensor:
    """:func:`masked_patch_cross_entropy` given only the masked patches' rows: ``(M, K), (M, K), (B, N) bool
    -> ()``, ``M = mask.sum()``, the rows in the order of ``mask.nonzero()`` (as ``x[mask]`` gives them).

    iBOT's student needs its patch logits only where the loss reads them, so its head runs on those rows
    alone (``IBOT.forward``)."""
    if mask.ndim != 2 or student_rows.shape[0] != int(mask.sum()):
        raise ValueError(f"{student_rows.shape[0]} rows for a mask {tuple(mask.shape)} with {int(mask.sum())} "
                         "masked patches")
    losses = _patch_cross_entropy(student_rows, teacher_rows, student_temp)  # (M,)
    image = mask.nonzero()[:, 0]
    per_image = losses.new_zeros(mask.shape[0]).index_add(0, image, losses)
    counts = mask.sum(dim=1).to(losses.dtype).clamp(min=1.0)
    return (per_image / counts).mean()


def patch_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float = 0.1,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """The (``weights``-weighted) mean of ``l`` over ``M`` patches: ``(M, K), (M, K), (M,) -> ()``.

    SlotMIM's patch losses pool all patches of a batch: the masked patches of a view (within-view loss)
    or the matched cells of two views' overlaps (cross-view loss, weight 0 for the cells of image pairs
    that share no region). Returns 0 when no patch has weight.
    """
    losses = _patch_cross_entropy(student_logits, teacher_probs, student_temp)
    if weights is None:
        weights = torch.ones_like(losses)
    weights = weights.to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(losses.dtype).tiny)
