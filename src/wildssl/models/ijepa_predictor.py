"""I-JEPA's predictor (Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture", CVPR 2023, Sec. 3 "Prediction"): a narrow ViT that, from the context
encoder's patch tokens, predicts the target encoder's tokens of each target block.

The context tokens are projected to the predictor's width and get its fixed 2-D sine-cosine position
embedding; each target block becomes one learned mask token per target position, plus that position's
embedding ("positional mask tokens"). The context is processed once per target block (the batch grows
``M``-fold), so a block's mask tokens see the context and each other but no other block. Contexts are
padded to one length; the padding is hidden from every query by a key-padding attention mask.
"""

from __future__ import annotations

import torch
from torch import nn

from wildssl.errors import ConfigError
from wildssl.models.position import sincos_position_embedding
from wildssl.models.vit import LAYER_NORM_EPS, Block, init_linear_and_norm


class IJEPAPredictor(nn.Module):
    """``(context tokens, context positions, target positions) -> predicted target tokens``.

    Args:
        encoder_dim: width of the encoder (input and output of the predictor).
        grid: ``(h, w)`` patch grid of the training crops (the position table is fixed to it).
        dim, depth, num_heads, mlp_ratio: the predictor transformer (the paper: 384 wide, the
            encoder's number of heads, 12 blocks for ViT-H).
    """

    def __init__(self, encoder_dim: int, grid: tuple[int, int], dim: int = 384, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if depth < 1 or num_heads < 1 or dim % num_heads:
            raise ConfigError(f"I-JEPA predictor: need depth >= 1 and a width divisible by its heads; got "
                              f"depth {depth}, width {dim}, heads {num_heads} (method.predictor_*)")
        self.grid = tuple(grid)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_position_embedding(self.grid, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(dim, encoder_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # The released I-JEPA: truncated normal (std .02) weights and mask token, zero biases.
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        init_linear_and_norm(self, lambda weight: nn.init.trunc_normal_(weight, std=0.02))

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, context: torch.Tensor, context_index: torch.Tensor, context_valid: torch.Tensor,
                target_index: torch.Tensor) -> torch.Tensor:
        """``context`` ``(B, C, D_enc)`` patch tokens at positions ``context_index`` ``(B, C)`` (long),
        ``context_valid`` ``(B, C)`` bool (False on padding), ``target_index`` ``(B, M, T)`` (long) ->
        predictions ``(B, M, T, D_enc)``."""
        batch, length = context_index.shape
        _, blocks, size = target_index.shape
        if context.shape[:2] != (batch, length) or context_valid.shape != (batch, length):
            raise ConfigError(f"I-JEPA predictor: context {tuple(context.shape)}, positions "
                              f"{tuple(context_index.shape)} and validity {tuple(context_valid.shape)} disagree")
        positions = self.pos_embed[0].to(context.dtype)  # (N, dim)
        x = self.embed(context) + positions[context_index]
        queries = self.mask_token.to(x.dtype) + positions[target_index]  # (B, M, T, dim)
        x = x.unsqueeze(1).expand(-1, blocks, -1, -1).reshape(batch * blocks, length, -1)
        tokens = torch.cat([x, queries.reshape(batch * blocks, size, -1)], dim=1)
        valid = torch.cat([context_valid.unsqueeze(1).expand(-1, blocks, -1).reshape(batch * blocks, length),
                           context_valid.new_ones(batch * blocks, size)], dim=1)
        attn_mask = valid[:, None, None, :]
        for block in self.blocks:
            tokens = block(tokens, attn_mask)
        out = self.proj(self.norm(tokens[:, length:]))
        return out.reshape(batch, blocks, size, -1)
