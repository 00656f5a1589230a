"""The latent cache of neighbour bootstrapping (AdaSim, Lebailly et al. ICCV 2023; NNCLR's support set):
one l2-normalized latent per dataset image, and the blocked top-K search over it.

``Z`` ``(N, d)`` holds, for every dataset index, the latent of the image's latest view; a row is *filled*
once the image has been seen. A step asks for the top-K cosine similarities of its latents to the cache
*before* its own rows are replaced (so an image's own entry is its previous view, and "the image is its
own nearest neighbour" means its latent is stable across views), then records its latents; the rows
change only after a finite step (:meth:`LatentCache.commit_step`). Under DDP every rank holds the whole
cache and the updates are gathered across ranks before they are recorded, so the caches stay identical.
"""

from __future__ import annotations

import torch
from torch import nn

# Cache rows per block of the top-K search: the similarity block is (B, chunk) floats.
DEFAULT_CHUNK = 65536


@torch.no_grad()
def blocked_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = DEFAULT_CHUNK,
                 valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of every query with the keys, block by block, never ``(B, N)`` at once.

    ``queries`` ``(B, d)``, ``keys`` ``(N, d)`` (l2-normalized for cosine similarities), ``valid`` ``(N,)``
    bool (keys to consider; all by default). Returns ``(values (B, k), indices (B, k))`` sorted by
    decreasing value, fp32; where fewer than ``k`` keys are valid the missing entries have index -1 and
    value 0. The products are computed in the keys' dtype (a half-precision cache is searched at half
    precision, the GPU's fast path) and ranked in fp32. Memory: ``O(B * (chunk + k))`` besides the inputs.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"blocked_topk needs k >= 1 and chunk >= 1, got k={k}, chunk={chunk}")
    batch, device = queries.shape[0], queries.device
    queries = queries.to(keys.dtype)
    best_values = torch.full((batch, k), float("-inf"), device=device)
    best_indices = torch.full((batch, k), -1, dtype=torch.long, device=device)
    for start in range(0, keys.shape[0], chunk):
        block = (queries @ keys[start: start + chunk].T).float()  # (B, c)
        if valid is not None:
            block.masked_fill_(~valid[start: start + chunk].unsqueeze(0), float("-inf"))
        values, indices = block.topk(min(k, block.shape[1]), dim=1)
        merged_values = torch.cat([best_values, values], dim=1)
        merged_indices = torch.cat([best_indices, indices + start], dim=1)
        # Stable sort keeps the earlier (lower-index) entry first among equal values, as a dense topk would.
        order = merged_values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_values, best_indices = merged_values.gather(1, order), merged_indices.gather(1, order)
    missing = torch.isinf(best_values)
    return best_values.masked_fill(missing, 0.0), best_indices.masked_fill(missing, -1)


class LatentCache(nn.Module):
    """``latents`` ``(N, d)`` (``dtype``: fp32, or fp16 / bf16 to halve memory and search time on a GPU)
    and ``filled`` ``(N,)`` bool, buffers (saved in checkpoints).

    :meth:`neighbours` reads the cache; :meth:`observe` records the step's (gathered) latents, which
    :meth:`commit_step` writes and :meth:`discard_step` drops. Memory ``N * (d * bytes(dtype) + 1)``.
    """

    latents: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int, chunk: int = DEFAULT_CHUNK, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("latents", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool))
        self.chunk = chunk
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def neighbours(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` cosine similarities of the l2-normalized ``queries`` ``(B, d)`` to the filled rows:
        ``(similarities (B, k), indices (B, k))``, index -1 where fewer than ``k`` rows are filled."""
        return blocked_topk(queries, self.latents, k, self.chunk, self.filled)

    @torch.no_grad()
    def observe(self, indices: torch.Tensor, latents: torch.Tensor) -> None:
        """Record ``latents`` ``(M, d)`` (l2-normalized) for dataset ``indices`` ``(M,)``, written at commit.
        Indices must be distinct (a step reads each image once)."""
        self.pending = (indices.to(self.latents.device), latents.to(self.latents.device, self.latents.dtype))

    @torch.no_grad()
    def commit_step(self) -> None:
        if self.pending is not None:
            indices, latents = self.pending
            self.latents.index_copy_(0, indices, latents)
            self.filled[indices] = True
        self.discard_step()

    def discard_step(self) -> None:
        self.pending = None
