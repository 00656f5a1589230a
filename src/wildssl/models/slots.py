"""Slots: one embedding per prototype and image, pooled from the patches assigned to that prototype
(SlotCon's and SlotMIM's semantic grouping; Wen et al. NeurIPS 2022, Sec. 3.1; Wen et al. CVPR 2025).

With patch embeddings ``z_n`` ``(N, D)`` of an image and their prototype scores ``s_nk`` (cosine of the
patch projection with prototype ``k``), the soft assignment of patch ``n`` is
``a_nk = softmax_k(s_nk / tau)`` and slot ``k`` is the assignment-weighted mean of the patches::

    slot_k = sum_n a_nk z_n / sum_n a_nk

A slot is *active* in an image when its prototype is the arg-max of at least one patch: only those
slots stand for something in the image, and only they enter SlotMIM's slot loss.
"""

from __future__ import annotations

import torch

# Added to the assignments so that a prototype no patch leans towards still has a defined (uniform)
# mean; the released code adds the same 1e-12 (1e-6 in fp16).
ASSIGNMENT_EPS = 1e-12


def attentive_slot_pooling(embeddings: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Slots ``(B, K, D)`` from patch ``embeddings`` ``(B, N, D)`` and prototype ``scores`` ``(B, N, K)``.

    Computed in fp32 (the normalization over patches divides small sums)."""
    assignments = torch.softmax(scores.float() / temperature, dim=-1) + ASSIGNMENT_EPS  # (B, N, K)
    weights = assignments / assignments.sum(dim=1, keepdim=True)
    return torch.einsum("bnk,bnd->bkd", weights, embeddings.float())


def owned_prototypes(scores: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bool: prototype ``k`` is the arg-max of at least one patch of image ``b``, from prototype
    ``scores`` ``(B, N, K)``."""
    batch, _, num_prototypes = scores.shape
    owned = torch.zeros(batch, num_prototypes, dtype=torch.bool, device=scores.device)
    return owned.scatter_(1, scores.argmax(dim=-1), True)
