"""The one Vision Transformer encoder every method shares (Dosovitskiy et al., ICLR 2021).

Parameter names are exactly those of timm's ``VisionTransformer`` so a trained encoder exports as a timm
state dict (:mod:`wildssl.models.export`). The only parameter timm lacks is ``mask_token`` (iBOT/SlotMIM
masked-image modelling), which the export drops.

Position embeddings follow timm's ``no_embed_class=True`` convention, as in timm's DINOv2-with-registers
models: ``pos_embed`` is ``(1, N, D)`` for the ``N`` patches of the stored ``img_size`` grid only; the cls
token and the registers (Darcet et al., "Vision Transformers Need Registers", ICLR 2024) get none. Crops on
another grid use the table resized bicubically in float32.

Token layout everywhere: ``[cls, reg_1 .. reg_R, patch_1 .. patch_N]``, so ``num_prefix_tokens = 1 + R``.
Encoders trained elsewhere without a cls token (I-JEPA, :mod:`wildssl.models.peers`) are built with
``class_token=False``: the layout is then ``[reg_1 .. reg_R, patch_1 .. patch_N]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wildssl.errors import ConfigError
from wildssl.models.attention import Attention

# width, depth, heads; mlp_ratio 4 throughout.
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "2b": (2560, 24, 32),
    "6.5b": (4096, 32, 32),
}

LAYER_NORM_EPS = 1e-6  # timm's and DINO's ViT value; the timm export relies on it matching


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., ECCV 2016) on a residual branch ``x`` of shape ``(B, ...)``.

    Each sample's branch is zeroed with probability ``drop_prob`` and otherwise scaled by
    ``1 / (1 - drop_prob)`` so the expectation is unchanged.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * keep.div_(keep_prob)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> linear embedding: ``(B, C, H, W) -> (B, h*w, D)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` feed-forward network of a transformer block."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float = 0.0,
                 is_causal: bool = False, norm_eps: float = LAYER_NORM_EPS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, is_causal)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``; ``attn_mask`` as :class:`~wildssl.models.attention.Attention`'s
        (bool, True = may attend), e.g. ``(B, 1, 1, T)`` to hide padding tokens from every query."""
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


def init_linear_and_norm(root: nn.Module, init_weight: Callable[[torch.Tensor], object]) -> None:
    """Every ``nn.Linear`` of ``root``: ``init_weight`` on its weight and a zero bias; every ``nn.LayerNorm``:
    weight 1, bias 0 (the timm / MAE / I-JEPA initialization, with the weight rule of each)."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            init_weight(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _mean_patch(patch: torch.Tensor, keep_valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of the patch tokens ``(B, N, D)`` over the valid ones (``keep_valid`` ``(B, N)``, or all)."""
    if keep_valid is None:
        return patch.mean(dim=1)
    weights = keep_valid.to(patch.dtype).unsqueeze(-1)
    return (patch * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


class VisionTransformer(nn.Module):
    """ViT encoder with a cls token, optional registers, a mask token and position-embedding resizing.

    Args:
        img_size: side of the square image the stored ``pos_embed`` grid is for (a multiple of
            ``patch_size``); other crop sizes are handled by resizing the table.
        num_register_tokens: ``R`` extra learned tokens after cls, without position embedding.
        drop_path_rate: stochastic-depth rate of the last block, rising linearly from 0 at the first.
        class_token: False builds an encoder without a cls token, only to load peers' weights that have
            none (I-JEPA); its ``forward`` then reports the mean of the patch tokens as ``cls``, the
            representation those encoders are evaluated with.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, num_register_tokens: int = 0,
                 drop_path_rate: float = 0.0, in_chans: int = 3, class_token: bool = True) -> None:
        super().__init__()
        _check_architecture(img_size, patch_size, embed_dim, depth, num_heads, num_register_tokens,
                            drop_path_rate)
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_register_tokens = num_register_tokens
        self.class_token = class_token
        self.num_prefix_tokens = int(class_token) + num_register_tokens
        self.grid_size = (img_size // patch_size, img_size // patch_size)

        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.register_parameter("cls_token", None)
        if num_register_tokens > 0:
            self.reg_token = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_parameter("reg_token", None)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Python floats, not torch.linspace, so the model also builds under `with torch.device("meta")`.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # DINO/timm: truncated normal (std .02) for tokens and linear weights, zero biases. The patch
        # convolution keeps PyTorch's default init as in DINO and timm; the mask token starts at zero
        # as in iBOT/DINOv2.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
        nn.init.zeros_(self.mask_token)
        init_linear_and_norm(self, lambda weight: nn.init.trunc_normal_(weight, std=0.02))

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (the learned tokens and position table)."""
        return {"pos_embed", "cls_token", "reg_token", "mask_token"}

    def layer_index(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay (BEiT, MAE fine-tuning): 0 for the patch
        embedding and the learned tokens, ``i + 1`` for block ``i``, ``depth + 1`` for the final norm."""
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith("norm."):
            return self.depth + 1
        return 0

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image of ``height x width`` pixels; both must divide by the patch."""
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(
                f"input images are {height}x{width} pixels; this ViT's patch size {self.patch_size} needs "
                f"height and width that are multiples of {self.patch_size} "
                f"(e.g. {height // self.patch_size * self.patch_size or self.patch_size}x"
                f"{width // self.patch_size * self.patch_size or self.patch_size})")
        return height // self.patch_size, width // self.patch_size

    def num_patches(self, img_size: int | tuple[int, int]) -> int:
        """Number of patch tokens of a square ``img_size`` or an ``(H, W)`` image."""
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        grid_h, grid_w = self.patch_grid(height, width)
        return grid_h * grid_w

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The ``(1, h*w, D)`` position table for a ``grid = (h, w)`` of patches.

        The stored table is resized bicubically (no antialiasing, in float32 so bf16 weights do not
        lose the small differences between neighbouring positions) when the grid differs; recomputed
        each call since it is tiny next to the blocks and stays differentiable.
        """
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        stored_h, stored_w = self.grid_size
        table = self.pos_embed.reshape(1, stored_h, stored_w, self.embed_dim).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=tuple(grid), mode="bicubic", align_corners=False,
                              antialias=False)
        return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], self.embed_dim).to(self.pos_embed.dtype)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> input tokens ``(B, 1 + R + N, D)`` before the blocks.

        ``mask`` ``(B, N)`` bool: True patches are replaced by ``mask_token`` before the position
        embedding is added (iBOT, Zhou et al. 2022), so the model knows where a masked patch was.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(f"the encoder takes images of shape (B, {self.in_chans}, H, W); got shape "
                              f"{tuple(x.shape)}")
        if not x.is_floating_point():  # uint8 pixels: the convolution's error would name its bias, not the input
            raise ConfigError(f"the encoder takes float images (normalized pixels), got {x.dtype}; "
                              "wildssl.data.views.preprocess_images turns uint8 pixels into them")
        grid = self.patch_grid(x.shape[-2], x.shape[-1])
        patches = self.patch_embed(x)  # (B, N, D)
        if mask is not None:
            if mask.shape != patches.shape[:2]:
                raise ConfigError(f"mask has shape {tuple(mask.shape)}; for these images it must be "
                                  f"(batch, patches) = {tuple(patches.shape[:2])}")
            patches = torch.where(mask.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        patches = patches + self.position_embedding(grid)
        prefix = [] if self.cls_token is None else [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        return torch.cat([p.to(patches.dtype) for p in prefix] + [patches], dim=1)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         keep_indices: torch.Tensor | None = None,
                         keep_valid: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``(B, 1 + R + N', D)``, as timm's ``forward_features``.

        ``keep_indices`` ``(B, K)`` long: only those patches (with their position embedding) enter the
        blocks, so ``N' = K`` (MAE, He et al. 2022; I-JEPA context encoder, Assran et al. 2023).
        ``keep_valid`` ``(B, K)`` bool (only with ``keep_indices``): False marks padding, for keep sets
        of different sizes padded to one length (I-JEPA's contexts). Padding tokens are hidden from
        every query of every block (a key-padding attention mask), so the valid tokens come out exactly
        as with the unpadded keep set; the padding rows' outputs are meaningless and must be ignored.
        """
        tokens = self.prepare_tokens(x, mask)
        attn_mask = None
        if keep_indices is not None:
            tokens = self._keep_patches(tokens, keep_indices)
            if keep_valid is not None:
                attn_mask = self._key_padding_mask(keep_indices, keep_valid)
        elif keep_valid is not None:
            raise ConfigError("keep_valid marks padding in keep_indices; pass keep_indices with it")
        for block in self.blocks:
            tokens = block(tokens, attn_mask)
        return self.norm(tokens)

    def _key_padding_mask(self, keep_indices: torch.Tensor, keep_valid: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 1, 1 + R + K)`` bool attention mask: prefix tokens and valid kept patches may be
        attended to, padding may not."""
        if keep_valid.shape != keep_indices.shape or keep_valid.dtype != torch.bool:
            raise ConfigError(f"keep_valid must be a bool tensor of the shape of keep_indices "
                              f"{tuple(keep_indices.shape)}; got {keep_valid.dtype} {tuple(keep_valid.shape)}")
        prefix = keep_valid.new_ones(keep_valid.shape[0], self.num_prefix_tokens)
        return torch.cat([prefix, keep_valid], dim=1)[:, None, None, :]

    def _keep_patches(self, tokens: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
        if keep_indices.ndim != 2 or keep_indices.shape[0] != tokens.shape[0]:
            raise ConfigError(f"keep_indices has shape {tuple(keep_indices.shape)}; it must be "
                              f"(batch={tokens.shape[0]}, kept patches)")
        prefix, patches = tokens[:, :self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]
        index = keep_indices.long().unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return torch.cat([prefix, torch.gather(patches, 1, index)], dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                keep_indices: torch.Tensor | None = None,
                keep_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named views of :meth:`forward_features`: ``cls`` ``(B, D)``, ``registers`` ``(B, R, D)``,
        ``patch`` ``(B, N', D)`` and ``tokens`` ``(B, 1 + R + N', D)``. Without a class token, ``cls``
        is the mean of the patch tokens and ``tokens`` is ``(B, R + N', D)`` (with ``keep_valid``, the
        mean of the valid ones)."""
        tokens = self.forward_features(x, mask, keep_indices, keep_valid)
        patch = tokens[:, self.num_prefix_tokens:]
        return {
            "cls": tokens[:, 0] if self.class_token else _mean_patch(patch, keep_valid),
            "registers": tokens[:, int(self.class_token):self.num_prefix_tokens],
            "patch": patch,
            "tokens": tokens,
        }

    def last_block_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block for images ``(B, C, H, W)``: ``(B, heads, T, T)``
        float32 over the token layout ``[cls, registers, patches]`` (DINO's ``get_last_selfattention``).

        A separate path: :meth:`forward` is unchanged and never forms these weights."""
        if self.depth == 0:
            raise ConfigError("this encoder has no blocks (depth 0), so it has no attention to read; "
                              "use an encoder with depth >= 1")
        tokens = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(tokens))


def _check_architecture(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                        num_register_tokens: int, drop_path_rate: float) -> None:
    if patch_size < 1 or img_size < patch_size or img_size % patch_size:
        raise ConfigError(f"model img_size {img_size} must be a positive multiple of patch_size {patch_size} "
                          f"(e.g. {max(1, img_size // max(patch_size, 1)) * max(patch_size, 1)})")
    if num_heads < 1 or embed_dim % num_heads:
        raise ConfigError(f"model embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    if depth < 0 or num_register_tokens < 0:
        raise ConfigError(f"model depth {depth} and num_register_tokens {num_register_tokens} must be >= 0")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ConfigError(f"model drop_path_rate {drop_path_rate} must be in [0, 1)")


def build_encoder(name: str = "small", patch_size: int = 16, img_size: int = 224, num_register_tokens: int = 0,
                  depth: int | None = None, embed_dim: int | None = None, num_heads: int | None = None,
                  drop_path_rate: float = 0.0) -> VisionTransformer:
    """A :class:`VisionTransformer` of a named size (``"small"`` or ``"vit_small"``, see
    :data:`ENCODER_SIZES`); ``depth`` / ``embed_dim`` / ``num_heads`` override the size's values."""
    size = name.lower().removeprefix("vit_")
    if size not in ENCODER_SIZES:
        raise ConfigError(f"unknown encoder {name!r}; valid names: {', '.join(ENCODER_SIZES)} "
                          f"(optionally prefixed 'vit_')")
    width, layers, heads = ENCODER_SIZES[size]
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=width if embed_dim is None else embed_dim,
        depth=layers if depth is None else depth,
        num_heads=heads if num_heads is None else num_heads,
        num_register_tokens=num_register_tokens,
        drop_path_rate=drop_path_rate,
    )
