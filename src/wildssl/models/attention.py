"""Multi-head attention, the one module every transformer of wildssl uses (ViT, text tower, decoders).

Both classes compute ``softmax(Q K^T / sqrt(d_head)) V`` with PyTorch's ``scaled_dot_product_attention``
(the flash / memory-efficient kernels where the device has them). Self-attention uses a fused qkv
projection laid out ``(3, heads, d_head)`` along the feature axis, as timm's, so ViT weights are
interchangeable with timm's; cross-attention projects the queries and the memory separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """``(M, heads, L, d_head) -> (M, L, heads * d_head)``."""
    batch, heads, length, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


class Attention(nn.Module):
    """Multi-head self-attention ``softmax(Q K^T / sqrt(d_head)) V`` with a fused qkv projection.

    The qkv output is laid out ``(3, heads, d_head)`` along the feature axis, as timm's, so the weights
    are interchangeable.
    """

    def __init__(self, dim: int, num_heads: int, is_causal: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_causal = is_causal  # token t attends to tokens <= t only (CLIP's text tower)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``. ``attn_mask`` (bool, True = may attend), broadcastable to
        ``(B, heads, T, T)``: e.g. ``(B, 1, 1, T)`` to hide padding tokens."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, d_head)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.is_causal)
        return self.proj(_merge_heads(out))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities ``softmax(Q K^T / sqrt(d_head))`` of ``x`` ``(B, T, D)``:
        ``(B, heads, T, T)`` float32, rows summing to 1 (row = query token).

        An explicit path beside :meth:`forward`, whose fused kernel never forms these weights; object
        discovery reads the cls row of the last block (DINO, Caron et al. 2021, Fig. 1)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.float().unbind(0)
        logits = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
        if self.is_causal:
            future = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).triu(1)
            logits = logits.masked_fill(future, float("-inf"))
        return logits.softmax(dim=-1)


class CrossAttention(nn.Module):
    """Queries ``(M, L, D)`` attend to a memory ``(M, N, D)``: ``q`` from the queries, ``kv`` (fused)
    from the memory. Used by box-query and probe decoders."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} must be divisible by its number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(M, L, D)``, ``(M, N, D)`` -> ``(M, L, D)``. ``attn_mask`` (bool, True = may attend),
        broadcastable to ``(M, heads, L, N)``; every query must be allowed at least one memory token."""
        m, length, _ = x.shape
        q = self.q(x).reshape(m, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(memory).reshape(m, memory.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))
