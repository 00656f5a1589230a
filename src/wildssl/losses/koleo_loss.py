"""KoLeo, the Kozachenko-Leonenko differential-entropy regularizer (Sablayrolles et al. 2019), as DINOv2
adds it to DINO's loss (Oquab et al. 2023, Sec. 4): ``-mean_i log ||z_i - z_nn(i)||`` over the
l2-normalized features of one batch, where ``nn(i)`` is the nearest other sample. It pushes each feature
away from its nearest neighbour, spreading the batch over the sphere: the spread that a k-NN probe reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo of a ``(B, D)`` batch (``B >= 2``), in fp32. The nearest neighbour is chosen without
    gradient; the distance to it carries the gradient (as DINOv2's ``KoLeoLoss``)."""
    if features.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples in a batch, got {features.shape[0]}")
    z = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = z @ z.T
        similarity.fill_diagonal_(-2.0)  # below any cosine: a sample is never its own neighbour
        nearest = similarity.argmax(dim=1)
    distances = (z - z[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()
