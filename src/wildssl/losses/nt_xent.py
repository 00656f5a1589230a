"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, Eq. 1)."""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F

from wildssl.distributed import gather_with_grad, get_rank


@overload
def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = ...,
    gather: bool = ...,
    return_accuracy: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = ...,
    gather: bool = ...,
    *,
    return_accuracy: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    gather: bool = True,
    return_accuracy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SimCLR contrastive loss between two views of the same images.

    ``z_a``, ``z_b``: ``(B, D)`` projections of view a and view b of this rank's ``B`` images (row ``i``
    of both comes from image ``i``). With ``u = z / ||z||``, ``sim(u, v) = u . v`` and ``N = 2 B W``
    embeddings gathered from ``W`` ranks, each local anchor ``u_i`` (both views: ``2B`` anchors) with
    positive ``u_p`` (the other view of the same image) has loss (Eq. 1)::

        l_i = -log( exp(sim(u_i, u_p) / t) / sum_{k != i} exp(sim(u_i, u_k) / t) )

    where ``k`` runs over all ``N - 1`` other embeddings of every rank (one positive, ``N - 2``
    negatives). Returns the mean of ``l_i`` over the ``2B`` local anchors (a scalar).

    Distributed: with ``gather=True`` the embeddings are gathered with :func:`gather_with_grad`. Each
    rank's loss is the mean over *its* anchors, so the mean of the ranks' losses is the single-process
    loss on the concatenated global batch, and after DDP averages gradients over ranks the parameter
    gradient equals the single-process gradient. Ranks must hold equal ``B``. ``gather=False`` treats
    the local batch as the whole batch.

    With ``return_accuracy=True`` also returns the detached fraction of local anchors whose most
    similar other embedding is their positive (top-1 positive retrieval), a float scalar tensor.

    The similarities are computed in float32 with autocast disabled: at ``t = 0.1`` the logits span
    +-10, and bf16 rounding of them would be of the order of the loss differences being learned.
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"nt_xent_loss needs z_a and z_b of equal shape (B, D), got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if not temperature > 0:  # NaN too
        raise ValueError(f"nt_xent_loss temperature must be > 0, got {temperature}")
    batch_size = z_a.shape[0]

    with torch.autocast(device_type=z_a.device.type, enabled=False):
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        u_a = F.normalize(z_a.to(dtype), dim=1)
        u_b = F.normalize(z_b.to(dtype), dim=1)
        if gather:
            all_a, all_b = gather_with_grad(u_a), gather_with_grad(u_b)
            offset = get_rank() * batch_size
        else:
            all_a, all_b, offset = u_a, u_b, 0
        global_batch = all_a.shape[0]

        anchors = torch.cat([u_a, u_b], dim=0)  # (2B, D): local view a rows, then local view b rows
        candidates = torch.cat([all_a, all_b], dim=0)  # (2BW, D): all view a rows, then all view b rows
        logits = anchors @ candidates.T / temperature  # (2B, 2BW)

        local = torch.arange(batch_size, device=z_a.device) + offset
        self_column = torch.cat([local, local + global_batch])
        positive_column = torch.cat([local + global_batch, local])
        rows = torch.arange(2 * batch_size, device=z_a.device)
        # An anchor is never its own negative: remove it from the softmax denominator.
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[rows, self_column] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        loss = F.cross_entropy(logits, positive_column)

    if not return_accuracy:
        return loss
    accuracy = (logits.detach().argmax(dim=1) == positive_column).float().mean()
    return loss, accuracy
