"""Box tokens, the box-query decoder and the annotation-bootstrapping head (seed 000, Alg. 2, Eq. 3-4).

For an ordered crop pair (source i, target j) the student encodes crop i with the backbone, turns
the box of crop j *in crop i's frame* into 4 query tokens, and a small transformer decoder whose
queries are those tokens (plus one learned readout query) cross-attends to crop i's backbone
tokens. The readout query's output is ``phi_AB(x_i, box_ij)``; the annotation-bootstrapping head scores
it against the annotations ``l_k`` as ``t_AB * cos(phi_AB, psi_AB(l_k))``.

Packing: all ``P = n (n - 1)`` pairs of all ``B`` images run in one pass. Query tokens are laid
out ``(B * n, n - 1, Q, D)``, grouped by source crop (pairs are source-major, see
:mod:`wildssl.data.pairs`). Self-attention runs per pair (reshaped to ``(B * P, Q, D)``, so pairs
never see each other), cross-attention per source crop (reshaped to ``(B * n, (n - 1) Q, D)``), so
the memory's keys and values are computed once per crop rather than copied for every pair.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from wildssl.data.boxes import discretize_box
from wildssl.errors import ConfigError
from wildssl.models.attention import Attention, CrossAttention
from wildssl.models.logit_scale import LogitScale

class BoxTokenizer(nn.Module):
    """Embed a relative box as 4 tokens, one per coordinate ``(x0, y0, x1, y1)``.

    Each coordinate is discretized into ``num_bins`` bins over ``value_range`` (a target crop can
    stick out of its source crop, so the range extends past ``[0, 1]``; values outside are clamped
    into the edge bins by :func:`wildssl.data.boxes.discretize_box`) and looked up in that
    coordinate's own embedding table; a learned per-coordinate type embedding is added.

    With ``use_box_tokens=False`` (the paper's "no box tokens" ablation) every box gets the same
    4 tokens: one learned mask token plus the type embeddings, so the query count and the
    decoder are unchanged and only the box information is removed. ``num_bins`` and
    ``value_range`` are then unused.
    """

    def __init__(
        self,
        dim: int,
        num_bins: int = 64,
        value_range: tuple[float, float] = (-1.0, 2.0),
        use_box_tokens: bool = True,
    ) -> None:
        super().__init__()
        self.use_box_tokens = use_box_tokens
        self.num_bins = num_bins
        self.value_range = tuple(value_range)
        self.type_embed = nn.Parameter(torch.zeros(4, dim))
        if use_box_tokens:
            # One table per coordinate, stored as one (4 * num_bins, dim) table with an offset per coordinate.
            self.coordinate_embed = nn.Embedding(4 * num_bins, dim)
            self.register_buffer("_offsets", torch.arange(4) * num_bins, persistent=False)
            nn.init.normal_(self.coordinate_embed.weight, std=0.02)
        else:
            self.mask_token = nn.Parameter(torch.zeros(dim))
            nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.type_embed, std=0.02)

    def forward(self, relative_boxes: torch.Tensor) -> torch.Tensor:
        """``(..., 4)`` relative boxes -> ``(..., 4, D)`` tokens."""
        if relative_boxes.shape[-1] != 4:
            raise ValueError(f"relative boxes must have shape (..., 4), got {tuple(relative_boxes.shape)}")
        if not self.use_box_tokens:
            return (self.mask_token + self.type_embed).expand(*relative_boxes.shape, -1)
        bins = discretize_box(relative_boxes, self.num_bins, self.value_range)
        return self.coordinate_embed(bins + self._offsets) + self.type_embed


class _DecoderBlock(nn.Module):
    """Pre-norm block: self-attention within each pair, cross-attention to the source crop, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """``queries (G, T, Q, D)``: T pairs of Q tokens per source crop; ``memory (G, N, D)``."""
        g, targets, q, d = queries.shape
        queries = queries + self.self_attn(self.norm1(queries).reshape(g * targets, q, d)).reshape(queries.shape)
        queries = queries + self.cross_attn(self.norm2(queries).reshape(g, targets * q, d), memory).reshape(
            queries.shape
        )
        return queries + self.mlp(self.norm3(queries))


class BoxQueryDecoder(nn.Module):
    """S-size transformer decoder with box-token queries, cross-attending to a source crop (seed 000).

    "S-size" fixes the width and heads of ViT-S (384, 6 heads); the depth is a parameter and
    defaults to 6 (half of ViT-S's 12): the decoder's queries are only 5 tokens per pair, so
    its cost is dominated by projecting the memory, once per crop and layer.

    Per pair the queries are the 4 box tokens of :class:`BoxTokenizer` followed by one learned
    readout query; ``phi_AB`` is the final-normalized output of the readout query.

    Args:
        memory_dim: width of the backbone tokens (projected to ``dim`` by a Linear).
        dim, depth, num_heads, mlp_ratio: decoder size.
        num_bins, value_range, use_box_tokens: see :class:`BoxTokenizer`.
    """

    def __init__(
        self,
        memory_dim: int,
        dim: int = 384,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_bins: int = 64,
        value_range: tuple[float, float] = (-1.0, 2.0),
        use_box_tokens: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"box-query decoder width {dim} must be divisible by its number of heads {num_heads} "
                              "(method.ab_decoder_width, method.ab_decoder_heads)")
        self.dim = dim
        self.memory_proj = nn.Linear(memory_dim, dim)
        self.box_tokenizer = BoxTokenizer(dim, num_bins, value_range, use_box_tokens)
        self.readout_query = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(_DecoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.readout_query, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, memory: torch.Tensor, relative_boxes: torch.Tensor) -> torch.Tensor:
        """Decode every ordered pair in one pass.

        Args:
            memory: ``(B, n, N, D_backbone)`` backbone tokens of each crop (image-major: crop ``i``
                of image ``b`` at ``[b, i]``).
            relative_boxes: ``(B, P, 4)`` target box in the source frame per pair, ``P = n (n - 1)``,
                in the source-major order of :func:`wildssl.data.pairs.ordered_pairs` (as
                ``pack_pairs`` returns them).

        Returns ``phi_AB``: ``(B, P, dim)``.
        """
        if memory.ndim != 4:
            raise ValueError(f"memory must have shape (B, n, N, D_backbone), got {tuple(memory.shape)}")
        batch, n_crops, n_tokens, _ = memory.shape
        num_pairs = n_crops * (n_crops - 1)
        if relative_boxes.shape != (batch, num_pairs, 4):
            raise ValueError(
                f"relative_boxes must have shape (B, n(n-1), 4) = {(batch, num_pairs, 4)} for memory of shape "
                f"{tuple(memory.shape)}, got {tuple(relative_boxes.shape)}"
            )
        memory = self.memory_proj(memory.reshape(batch * n_crops, n_tokens, -1))
        box_tokens = self.box_tokenizer(relative_boxes.reshape(batch * n_crops, n_crops - 1, 4))
        readout = self.readout_query.expand(batch * n_crops, n_crops - 1, 1, -1)
        queries = torch.cat((box_tokens, readout), dim=2)
        for block in self.blocks:
            queries = block(queries, memory)
        return self.norm(queries[:, :, -1]).reshape(batch, num_pairs, self.dim)


class AnnotationBootstrapHead(nn.Module):
    """The student side of annotation bootstrapping: ``phi_AB``, ``psi_AB`` and ``t_AB`` (seed 000, Alg. 1,
    Eq. 4): ``logit(pair, l_k) = t_AB * cos(phi_AB(x_i, box_ij), psi_AB(l_k))``.

    ``psi_AB`` is independent of the base method's own annotation head and trained by the bootstrap
    loss alone, in one of two forms (the paper's):

    - ``feature_dim``: annotations that the student's annotation backbone encodes (captions through the
      text tower for CLIP; the annotation images' second views through the image backbone for SimCLR):
      ``psi_AB`` is a Linear (no bias) from those ``(K, feature_dim)`` features, which carry gradient into
      the backbone;
    - ``num_annotations``: a fixed set of K annotations (DINO's prototypes): ``psi_AB`` is a learned
      ``(K, dim)`` embedding matrix.

    ``t_AB`` is a :class:`~wildssl.models.logit_scale.LogitScale` starting at ``init_scale`` (CLIP's
    1 / 0.07), its logarithm clamped to [0, ln 100] after every step.
    """

    def __init__(self, decoder: BoxQueryDecoder, feature_dim: int | None = None, num_annotations: int | None = None,
                 init_scale: float = 1 / 0.07) -> None:
        super().__init__()
        if (feature_dim is None) == (num_annotations is None):
            raise ValueError("AnnotationBootstrapHead takes exactly one of feature_dim (annotations encoded by a "
                             f"backbone) and num_annotations (a fixed set), got {feature_dim} and {num_annotations}")
        self.decoder = decoder
        self.fixed_set = num_annotations is not None
        if not self.fixed_set:
            self.annotation_head = nn.Linear(feature_dim, decoder.dim, bias=False)
            nn.init.trunc_normal_(self.annotation_head.weight, std=0.02)
        else:
            self.annotation_embedding = nn.Parameter(torch.empty(num_annotations, decoder.dim))
            nn.init.trunc_normal_(self.annotation_embedding, std=0.02)
        self.logit_scale = LogitScale(init_temperature=1.0 / init_scale)

    def forward(self, memory: torch.Tensor, relative_boxes: torch.Tensor) -> torch.Tensor:
        """``phi_AB (B, P, D)``; see :meth:`BoxQueryDecoder.forward`."""
        return self.decoder(memory, relative_boxes)

    def annotations(self, features: torch.Tensor | None = None) -> torch.Tensor:
        """``psi_AB``: ``(K, feature_dim)`` annotation features -> ``(K, D)``, or (fixed set, no features)
        the ``(K, D)`` embedding matrix."""
        if self.fixed_set:
            if features is not None:
                raise ValueError("this head embeds a fixed annotation set; it takes no annotation features")
            return self.annotation_embedding
        if features is None:
            raise ValueError("this head maps annotation features (K, feature_dim); none were given")
        return self.annotation_head(features)

    def logits(self, phi: torch.Tensor, annotations: torch.Tensor) -> torch.Tensor:
        """``t_AB * normalize(phi) . normalize(annotations)``, in fp32 (fp64 stays fp64).

        Args:
            phi: ``(B, P, D)`` decoder outputs.
            annotations: ``(K, D)`` ``psi_AB`` of the annotations (:meth:`annotations`).

        Returns ``(B, P, K)`` logits.
        """
        # Cosines times a scale near 100 need fp32 (as clip_loss and nt_xent): bf16 would round the logits
        # by about 0.4, the size of the differences being learned.
        dtype = torch.promote_types(phi.dtype, torch.float32)
        with torch.autocast(device_type=phi.device.type, enabled=False):
            annotations = F.normalize(annotations.to(dtype), dim=-1)
            return self.logit_scale().to(dtype) * F.normalize(phi.to(dtype), dim=-1) @ annotations.T
