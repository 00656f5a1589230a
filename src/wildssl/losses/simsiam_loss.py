"""SimSiam's symmetrized negative cosine with stop-gradient (Chen & He, CVPR 2021, Eq. 1-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean_b cos(p_b, stopgrad(z_b)) (Eq. 1 with Eq. 3's stop-gradient), in fp32.

    ``p`` ``(B, D)``: predictor outputs; ``z`` ``(B, D)``: projector outputs of the other view, detached
    here: the stop-gradient is what keeps SimSiam from collapsing (the paper's Sec. 4.1). Returns a scalar in
    [-1, 1].
    """
    if p.shape != z.shape or p.ndim != 2:  # (4, 8) against (4, 1) or (1, 8) broadcast without a word
        raise ValueError(f"negative_cosine needs p and z of one shape (B, D), got {tuple(p.shape)} and {tuple(z.shape)}")
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def simsiam_loss(p_a: torch.Tensor, p_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """L = D(p_a, z_b) / 2 + D(p_b, z_a) / 2 (Eq. 2): each view's prediction of the other's projection.

    All inputs ``(B, D)``; ``a`` and ``b`` are the two views (AdaSim: ``b`` may be cut from a neighbour)."""
    return 0.5 * negative_cosine(p_a, z_b) + 0.5 * negative_cosine(p_b, z_a)
