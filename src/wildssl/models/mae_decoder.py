"""MAE's light decoder (He et al. 2022, Sec. 3 "MAE decoder"): the encoded visible patches plus one
shared, learned mask token at every hidden position, each with a fixed 2-D sine-cosine position
embedding of its own (not the encoder's), through a few transformer blocks to a linear layer that
predicts each patch's pixels.

Default 8 blocks x 512 wide: per token about 9% of ViT-L's encoder work, and since the encoder sees a
quarter of the patches, the decoder is a small part of a step even though it sees all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from wildssl.errors import ConfigError
from wildssl.models.position import sincos_position_embedding
from wildssl.models.vit import LAYER_NORM_EPS, Block, init_linear_and_norm


class MAEDecoder(nn.Module):
    """Encoder tokens of the visible patches -> pixels of every patch.

    Args:
        encoder_dim: width of the encoder's tokens.
        grid: ``(h, w)`` patch grid of the training crops (the position table is fixed to it).
        patch_size, in_chans: the output per patch is ``patch_size ** 2 * in_chans`` values.
        dim, depth, num_heads, mlp_ratio: the decoder transformer.
        num_prefix_tokens: the encoder's cls + register tokens, passed through the decoder (as MAE's
            cls token) without a position embedding, and dropped from the output.
    """

    def __init__(self, encoder_dim: int, grid: tuple[int, int], patch_size: int, in_chans: int = 3,
                 dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if depth < 1 or num_heads < 1 or dim % num_heads:
            raise ConfigError(f"MAE decoder: need depth >= 1 and a width divisible by its heads; got depth "
                              f"{depth}, width {dim}, heads {num_heads} (method.decoder_*)")
        self.grid = tuple(grid)
        self.num_patches = grid[0] * grid[1]
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, so not saved: the grid rebuilds it exactly.
        self.register_buffer("pos_embed", sincos_position_embedding(self.grid, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        # The released MAE: xavier-uniform linear layers, zero biases, mask token N(0, 0.02).
        nn.init.normal_(self.mask_token, std=0.02)
        init_linear_and_norm(self, nn.init.xavier_uniform_)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, tokens: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, prefix + K, D_enc)`` (the encoder's output on the visible patches),
        ``keep_indices`` ``(B, K)`` (their positions) -> pixel predictions ``(B, N, p * p * C)`` for all
        ``N`` patches of the grid, in patch order."""
        batch, kept = keep_indices.shape
        if tokens.shape[1] != self.num_prefix_tokens + kept:
            raise ConfigError(f"MAE decoder: {tokens.shape[1]} tokens for {kept} kept patches and "
                              f"{self.num_prefix_tokens} prefix tokens")
        x = self.embed(tokens)
        prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        # Undo the shuffle: mask tokens everywhere, the visible tokens written back at their positions.
        full = self.mask_token.to(x.dtype).expand(batch, self.num_patches, -1)
        index = keep_indices.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
        full = torch.scatter(full, 1, index, visible) + self.pos_embed.to(x.dtype)
        x = torch.cat([prefix, full], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, self.num_prefix_tokens:]
