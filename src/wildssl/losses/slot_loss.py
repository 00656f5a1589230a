"""SlotMIM's slot contrastive loss (Wen et al. CVPR 2025; SlotCon, Wen et al. NeurIPS 2022, Eq. 5),
MoCo v3 style (Chen et al. ICCV 2021): the student's slots of one view, through a predictor, against the
teacher's slots of the other view.

A *query* is a slot ``(b, k)`` (image ``b``, prototype ``k``) active in both the student's view and the
teacher's view of image ``b`` (:func:`wildssl.models.slots.owned_prototypes`); its key is the teacher's
slot ``(b, k)`` of the other view. Every teacher slot active in its view, of every image of the global
batch, is a candidate; the query's own key is the positive, all others are negatives. With
``q = normalize(predictor(student slot))``, ``t = normalize(teacher slot)`` and temperature ``tau``::

    l(b, k) = -log( exp(q . t_(b,k) / tau) / sum_{(b', k') active} exp(q . t_(b',k') / tau) )
    L = 2 tau * mean over queries of l(b, k)

The ``2 tau`` factor is MoCo v3's (it keeps the gradient scale independent of ``tau``); SlotMIM's
released ``ctr_loss_filtered`` keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wildssl.distributed import all_gather_no_grad, get_rank


def matched_slots(query_active: torch.Tensor, key_active: torch.Tensor) -> torch.Tensor:
    """Flat indices ``b * K + k`` ``(M,)`` of the slots active in both ``(B, K)`` bool masks, in order."""
    return (query_active & key_active).flatten().nonzero().squeeze(-1)


def slot_contrastive_loss(queries: torch.Tensor, query_index: torch.Tensor, keys: torch.Tensor,
                          key_active: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """The loss above, a scalar in fp32.

    ``queries`` ``(M, D)``: the predictor's outputs for the query slots (not yet normalized);
    ``query_index`` ``(M,)`` long: their flat indices ``b * K + k`` into this rank's slots (from
    :func:`matched_slots`, so that each query's own key is active); ``keys`` ``(B, K, D)``: the teacher's
    slots of the other view; ``key_active`` ``(B, K)`` bool.

    Distributed: the teacher's slots and their masks are gathered from every rank (without gradient: the
    teacher is not trained by this loss), so the candidates are the active slots of the global batch, and
    this rank's mean is over its own queries. Ranks must hold equal ``B`` and ``K``. No query gives 0.
    """
    if not temperature > 0:  # NaN too
        raise ValueError(f"slot contrastive temperature must be > 0, got {temperature}")
    batch, num_slots, _ = keys.shape
    if key_active.shape != (batch, num_slots):
        raise ValueError(f"key_active {tuple(key_active.shape)} does not match the keys {tuple(keys.shape)}")
    # One collective for slots and masks (the mask rides along as an extra channel), on every rank even
    # when this one has no query: a rank that skipped it would leave the others waiting.
    packed = all_gather_no_grad(torch.cat((keys.float(), key_active.float().unsqueeze(-1)), dim=-1)).flatten(0, 1)
    if queries.shape[0] == 0:
        return queries.float().sum() * 0.0
    candidates_active = packed[:, -1] > 0.5
    candidates = F.normalize(packed[candidates_active, :-1], dim=-1)
    # The positive's place among the active candidates: how many active slots come before it.
    positive = query_index + get_rank() * batch * num_slots
    labels = candidates_active.long().cumsum(dim=0)[positive] - 1
    logits = F.normalize(queries.float(), dim=-1) @ candidates.T / temperature
    return F.cross_entropy(logits, labels) * (2.0 * temperature)
