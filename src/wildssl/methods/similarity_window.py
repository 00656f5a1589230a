"""AdaSim's windowed similarity and its positive-pair rule (Lebailly et al., ICCV 2023, Sec. 3, Eq. 9-11).

Every epoch e, each image i seen gets its top-K support N_e(i) in the latent cache with similarities
s_e(i, j) (:mod:`wildssl.methods.latent_cache`). Over the last w epochs:

    m_win(i, j) = (1 / w) * sum_e s_e(i, j) * [j in N_e(i)]                       (Eq. 11)

(an entry outside an epoch's support, or an epoch where i was not seen, counts as 0). On the union
support U(i) = union_e N_e(i) the sampling distribution is

    p_win(j | i) = softmax_{j in U(i)}(m_win(i, j) / tau)                          (Eq. 9-10)

and the rule is adaptive: only when i itself is the argmax of m_win(i, .) (the latent space is stable
enough that i is its own nearest neighbour across views) is a partner j* drawn from p_win; otherwise the
pair is the standard one, (t(x_i), t'(x_i)). tau = 0 makes p_win one-hot on the argmax, which is then i
itself: every pair is standard. The released code keeps only the K largest m_win of the union before the
softmax; here the distribution covers the whole union, as the issue that specified this library asks.

The functions are the functional core (pure, batched over the queried images); :class:`SimilarityWindow`
holds the per-epoch records, O(N * K * w) memory, and updates them only after a finite step.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def windowed_similarity(neighbours: torch.Tensor, similarities: torch.Tensor,
                        window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11 on the union support of each row.

    ``neighbours`` ``(B, w, K)`` long (dataset indices, -1 = empty) and ``similarities`` ``(B, w, K)``: the
    top-K records of the last ``w`` epochs of B images. Returns ``(support, mean)``, both ``(B, w * K)``:
    row b lists the distinct indices of U(b) in increasing order, left-aligned and padded with -1, and
    ``mean`` their m_win (0 at the padding). The sum over epochs is divided by ``window`` (epochs where j
    was outside the support, or b was not seen, contribute 0).
    """
    batch = neighbours.shape[0]
    flat_ids = neighbours.reshape(batch, -1).long()
    flat_sims = similarities.reshape(batch, -1).float()
    width = flat_ids.shape[1]
    valid = flat_ids >= 0
    # Empty entries sort last (key = width of the id space), then equal ids become runs.
    sort_key = torch.where(valid, flat_ids, torch.full_like(flat_ids, torch.iinfo(torch.long).max))
    sorted_ids, order = sort_key.sort(dim=1, stable=True)
    sorted_sims = flat_sims.gather(1, order)
    sorted_valid = valid.gather(1, order)
    starts = sorted_valid.clone()
    starts[:, 1:] &= sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = starts.long().cumsum(dim=1) - 1  # run number of each entry (-1 before the first run: never valid)
    # Invalid entries go to an extra column that is dropped.
    column = torch.where(sorted_valid, group, torch.full_like(group, width))
    total = torch.zeros(batch, width + 1, dtype=torch.float32, device=flat_sims.device)
    total.scatter_add_(1, column, torch.where(sorted_valid, sorted_sims, torch.zeros_like(sorted_sims)))
    support = torch.full((batch, width + 1), -1, dtype=torch.long, device=flat_ids.device)
    support.scatter_(1, torch.where(starts, group, torch.full_like(group, width)),
                     torch.where(starts, sorted_ids, torch.full_like(sorted_ids, -1)))
    return support[:, :width], total[:, :width] / window


def _masked_argmax(support: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Column of the largest ``mean`` among the valid entries of each row (the first one on ties)."""
    return mean.masked_fill(support < 0, float("-inf")).argmax(dim=1)


@torch.no_grad()
def sampling_probabilities(support: torch.Tensor, mean: torch.Tensor, tau: float) -> torch.Tensor:
    """p_win (Eq. 9-10): ``softmax(mean / tau)`` over each row's valid entries, 0 on the padding; ``tau = 0``
    gives the one-hot of the argmax. Rows without a valid entry are all 0. Shapes ``(B, L)``."""
    valid = support >= 0
    if tau == 0:
        probs = torch.zeros_like(mean)
        probs.scatter_(1, _masked_argmax(support, mean).unsqueeze(1), 1.0)
    else:
        probs = torch.softmax(mean.float().masked_fill(~valid, float("-inf")) / tau, dim=1)
    return torch.where(valid, probs, torch.zeros_like(probs))


@torch.no_grad()
def adaptive_partners(support: torch.Tensor, mean: torch.Tensor, images: torch.Tensor, tau: float,
                      uniforms: torch.Tensor) -> torch.Tensor:
    """AdaSim's rule: the partner j* of each image, or the image itself for a standard pair.

    ``support``, ``mean`` ``(B, L)`` from :func:`windowed_similarity`; ``images`` ``(B,)`` the images'
    own dataset indices; ``uniforms`` ``(B,)`` in [0, 1), one draw per image (inverse-CDF sampling of
    p_win). Where the argmax of m_win is another image, or the row is empty, the partner is the image.
    """
    rows = torch.arange(support.shape[0], device=support.device)
    has_support = (support >= 0).any(dim=1)
    self_is_argmax = has_support & (support[rows, _masked_argmax(support, mean)] == images)
    probs = sampling_probabilities(support, mean, tau)
    drawn = (probs.cumsum(dim=1) <= uniforms.unsqueeze(1)).sum(dim=1)
    # Rounding can leave the cumulative sum a hair under the draw: stay on the last valid entry.
    drawn = torch.minimum(drawn, ((support >= 0).sum(dim=1) - 1).clamp(min=0))
    return torch.where(self_is_argmax, support[rows, drawn], images)


@torch.no_grad()
def nearest_other(neighbours: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The +NN baseline (NNCLR-style): the most similar entry of each row of a top-K record ``(B, K)``
    (sorted by decreasing similarity, -1 = empty) that is not the image itself ``(B,)``; the image
    itself when there is none."""
    other = (neighbours >= 0) & (neighbours != images.unsqueeze(1))
    first = other.long().argmax(dim=1)  # argmax returns the first True
    chosen = neighbours.gather(1, first.unsqueeze(1)).squeeze(1)
    return torch.where(other.any(dim=1), chosen, images)


class SimilarityWindow(nn.Module):
    """The top-K records of the last ``window`` epochs, and the record of the running epoch.

    Buffers (saved in checkpoints): ``neighbours`` ``(w, N, K)`` int32 (-1 = empty) and ``similarities``
    ``(w, N, K)`` fp32, a ring indexed by ``epochs_seen % w``; ``current_neighbours`` ``(N, K)``,
    ``current_similarities`` ``(N, K)``, ``current_seen`` and ``current_partnered`` ``(N,)`` bool for the
    running epoch; ``epochs_seen`` (completed epochs). Memory: ``8 N K (w + 1) + 2 N + 8`` bytes.
    """

    neighbours: torch.Tensor
    similarities: torch.Tensor
    current_neighbours: torch.Tensor
    current_similarities: torch.Tensor
    current_seen: torch.Tensor
    current_partnered: torch.Tensor
    epochs_seen: torch.Tensor

    def __init__(self, size: int, topk: int, window: int) -> None:
        super().__init__()
        self.window, self.topk = window, topk
        self.register_buffer("neighbours", torch.full((window, size, topk), -1, dtype=torch.int32))
        self.register_buffer("similarities", torch.zeros(window, size, topk))
        self.register_buffer("current_neighbours", torch.full((size, topk), -1, dtype=torch.int32))
        self.register_buffer("current_similarities", torch.zeros(size, topk))
        self.register_buffer("current_seen", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("current_partnered", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.pending: tuple[torch.Tensor, ...] | None = None

    @property
    def completed_epochs(self) -> int:
        return int(self.epochs_seen)

    def history(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The records of ``images`` ``(B,)`` over the window: ``(neighbours (B, w, K) long, similarities
        (B, w, K))`` on the CPU, in no particular epoch order (Eq. 11 is a sum)."""
        rows = images.to(self.neighbours.device)
        return (self.neighbours[:, rows].transpose(0, 1).long().cpu(),
                self.similarities[:, rows].transpose(0, 1).cpu())

    def latest(self, images: torch.Tensor) -> torch.Tensor:
        """The top-K record ``(B, K)`` long (CPU) of ``images`` in the last completed epoch."""
        slot = (self.completed_epochs - 1) % self.window
        return self.neighbours[slot, images.to(self.neighbours.device)].long().cpu()

    @torch.no_grad()
    def observe(self, images: torch.Tensor, neighbours: torch.Tensor, similarities: torch.Tensor,
                partnered: torch.Tensor) -> None:
        """Record this step's top-K ``(M, K)`` of distinct ``images`` ``(M,)`` and whether each was paired
        with another image ``(M,)`` bool; written at :meth:`commit_step`."""
        device = self.current_neighbours.device
        self.pending = (images.to(device), neighbours.to(device, torch.int32),
                        similarities.to(device, torch.float32), partnered.to(device, torch.bool))

    @torch.no_grad()
    def commit_step(self) -> None:
        if self.pending is not None:
            images, neighbours, similarities, partnered = self.pending
            self.current_neighbours[images] = neighbours
            self.current_similarities[images] = similarities
            self.current_seen[images] = True
            self.current_partnered[images] = partnered
        self.discard_step()

    def discard_step(self) -> None:
        self.pending = None

    @torch.no_grad()
    def push_epoch(self) -> None:
        """End of an epoch: the running record enters the ring (replacing the oldest) and is reset."""
        slot = self.completed_epochs % self.window
        self.neighbours[slot] = self.current_neighbours
        self.similarities[slot] = self.current_similarities
        self.current_neighbours.fill_(-1)
        self.current_similarities.zero_()
        self.current_seen.zero_()
        self.current_partnered.zero_()
        self.epochs_seen += 1

    @torch.no_grad()
    def epoch_diagnostics(self, labels: torch.Tensor | None) -> dict[str, float]:
        """The running epoch's figures (over the images it saw):

        - ``neighbour_ratio``: fraction paired with another image (the bootstrapping ratio);
        - ``nn_self_ratio``: fraction whose nearest cache entry was their own previous view;
        - with ``labels`` ``(N,)`` (-1 = none): ``nn_top1_accuracy`` / ``nn2_top1_accuracy``, the fraction of
          labelled images whose first / second cache neighbour has their label (the first is often the
          image itself, which counts as correct, as in the seed's logs).
        """
        seen = self.current_seen
        count = int(seen.sum())
        if count == 0:
            return {}
        images = torch.arange(seen.shape[0], device=seen.device)[seen]
        neighbours = self.current_neighbours[seen].long()
        figures = {"neighbour_ratio": float(self.current_partnered[seen].float().mean()),
                   "nn_self_ratio": float((neighbours[:, 0] == images).float().mean())}
        if labels is not None:
            labels = labels.to(seen.device)
            own = labels[images]
            for column, name in ((0, "nn_top1_accuracy"), (1, "nn2_top1_accuracy")):
                if column >= neighbours.shape[1]:
                    continue
                ids = neighbours[:, column]
                usable = (own >= 0) & (ids >= 0)
                if usable.any():
                    figures[name] = float((labels[ids[usable]] == own[usable]).float().mean())
        return figures


@torch.no_grad()
def spread_of(latents: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 65536) -> dict[str, float]:
    """Collapse signals of the l2-normalized latents ``(M, d)`` (the rows where ``rows`` ``(M,)`` bool is
    True, all by default): ``cache_embedding_std``, the mean per-dimension std times sqrt(d) (about 1 when
    spread over the sphere, 0 when all coincide), and ``cache_effective_rank``, exp of the entropy of the
    normalized covariance spectrum (Roy & Vetterli 2007; between 1 and d). The covariance is accumulated
    in float64 over blocks of ``chunk`` rows, so no copy of the cache is made."""
    dim = latents.shape[1]
    count = int(rows.sum()) if rows is not None else latents.shape[0]
    if count < 2:
        return {}
    total = torch.zeros(dim, dtype=torch.float64, device=latents.device)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=latents.device)
    for start in range(0, latents.shape[0], chunk):
        block = latents[start: start + chunk]
        if rows is not None:
            block = block[rows[start: start + chunk]]
        block = block.double()
        total += block.sum(dim=0)
        gram += block.T @ block
    mean = total / count
    covariance = (gram - count * torch.outer(mean, mean)) / (count - 1)
    spectrum = torch.linalg.eigvalsh(covariance).clamp(min=0)
    if spectrum.sum() <= 0:
        rank = 1.0
    else:
        p = spectrum / spectrum.sum()
        rank = float(torch.exp(-(p * torch.log(p.clamp(min=1e-300))).sum()))
    return {"cache_embedding_std": float(covariance.diagonal().clamp(min=0).sqrt().mean()) * math.sqrt(dim),
            "cache_effective_rank": rank}
