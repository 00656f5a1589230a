"""Fixed 2-D sine-cosine position embeddings (Vaswani et al. 2017, made 2-D as in MoCo v3 and MAE).

MAE (He et al. 2022, Sec. A.1) and I-JEPA (Assran et al. 2023) use them, frozen, in the encoder, the
MAE decoder and the I-JEPA predictor: a table that needs no learning gives every position its place
from the first step, which matters most for the mask tokens, whose only content is their position.
"""

from __future__ import annotations

import torch
from torch import nn

from wildssl.errors import ConfigError


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(L,)`` positions -> ``(L, dim)``: ``[sin(p w_0) .. sin(p w_{dim/2-1}), cos(p w_0) ..]`` with
    ``w_i = 10000^(-2i / dim)``, in float64 for exactness (callers cast)."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_position_embedding(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """The ``(1, h * w, dim)`` float32 table of an ``(h, w)`` patch grid, in the encoder's patch order
    (row-major): the first half of the channels encodes the column, the second half the row, each
    with :func:`sincos_1d`. ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ConfigError(f"a 2-D sine-cosine position embedding needs a width divisible by 4; got {dim}")
    height, width = grid
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    table = torch.cat([sincos_1d(cols.flatten(), dim // 2), sincos_1d(rows.flatten(), dim // 2)], dim=1)
    return table.float().unsqueeze(0)


def freeze_sincos_positions(encoder: nn.Module) -> None:
    """Overwrite a :class:`~wildssl.models.vit.VisionTransformer`'s ``pos_embed`` with the fixed table
    of its stored grid and stop its gradient (MAE, I-JEPA). Crops on another grid still get the table
    resized, as any encoder's."""
    with torch.no_grad():
        encoder.pos_embed.copy_(sincos_position_embedding(encoder.grid_size, encoder.embed_dim))
    encoder.pos_embed.requires_grad_(False)
