"""CLIP text tower (Radford et al. 2021, Sec. 2.4; sizes and init as in open_clip).

tokens (B, L) -> token + learned positional embedding -> ``depth`` pre-norm residual blocks with causal
self-attention -> final LayerNorm -> hidden state at the first EOT token -> linear projection (no bias)
-> (B, embed_dim), unnormalized.
"""

from __future__ import annotations


import torch
from torch import nn

from wildssl.errors import ConfigError
from wildssl.models.tokenizer import EOT_ID
from wildssl.models.vit import Block


def _causal_block(width: int, heads: int) -> Block:
    """The image ViT's pre-norm block with causal attention (PyTorch's default LayerNorm eps, as CLIP)."""
    return Block(width, heads, mlp_ratio=4.0, is_causal=True, norm_eps=1e-5)

# name -> (width, depth, heads); open_clip's text towers paired with ViT-S/B/L/H.
TEXT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (512, 12, 8),
    "large": (768, 12, 12),
    "huge": (1024, 24, 16),
}


class TextTransformer(nn.Module):
    """CLIP text encoder: ``forward(tokens (B, L)) -> (B, embed_dim)`` pooled at the first ``eot_id``.

    ``L <= context_length``; every row must contain ``eot_id`` (``CaptionTokenizer.encode_batch``
    guarantees it). Causal attention means positions after the EOT (padding) never reach the output.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        context_length: int = 77,
        width: int = 384,
        depth: int = 12,
        heads: int = 6,
        eot_id: int = EOT_ID,
    ):
        super().__init__()
        if width % heads:
            raise ConfigError(
                f"text tower width {width} is not divisible by its {heads} heads; pick heads dividing width"
            )
        if not 0 <= eot_id < vocab_size:
            raise ConfigError(f"text tower eot_id {eot_id} is outside the vocabulary of {vocab_size} ids")
        self.context_length = context_length
        self.eot_id = eot_id
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList([_causal_block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim, bias=False)
        self._init_weights(width, depth)

    def _init_weights(self, width: int, depth: int) -> None:
        # open_clip TextTransformer.init_parameters: residual-branch outputs shrink with 1/sqrt(2 * depth)
        # so the residual stream's variance does not grow with depth.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.projection.weight, std=width**-0.5)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-LayerNorm hidden states at every position: ``(B, L) -> (B, L, width)``."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"tokens have length {length}, longer than the text tower's context_length {self.context_length}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pooled_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` ids -> ``(B, width)`` final-LayerNorm hidden state at the first EOT, before the
        projection (annotation bootstrapping puts its own head, psi_AB, here)."""
        hidden = self.forward_tokens(tokens)
        # argmax returns the first maximal index, i.e. the first EOT of each row.
        eot_position = (tokens == self.eot_id).int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), eot_position]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` ids -> ``(B, embed_dim)`` unnormalized text embeddings."""
        return self.projection(self.pooled_features(tokens))


def build_text_tower(
    size: str,
    vocab_size: int,
    embed_dim: int,
    context_length: int = 77,
    *,
    depth: int | None = None,
    width: int | None = None,
    heads: int | None = None,
    eot_id: int = EOT_ID,
) -> TextTransformer:
    """A :class:`TextTransformer` of a named size (``TEXT_SIZES``), any of width/depth/heads overridden."""
    if size not in TEXT_SIZES:
        raise ConfigError(f"text tower size is {size!r}; expected one of {', '.join(TEXT_SIZES)}")
    size_width, size_depth, size_heads = TEXT_SIZES[size]
    return TextTransformer(
        vocab_size=vocab_size,
        embed_dim=embed_dim,
        context_length=context_length,
        width=size_width if width is None else width,
        depth=size_depth if depth is None else depth,
        heads=size_heads if heads is None else heads,
        eot_id=eot_id,
    )
