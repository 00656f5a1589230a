"""Projection heads that methods put on top of the encoder's cls (or patch) features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from wildssl.errors import ConfigError


def _check_layers(head: str, num_layers: int) -> None:
    if num_layers < 1:
        raise ConfigError(f"{head} num_layers is {num_layers}; it must be at least 1")


class ProjectionHead(nn.Module):
    """SimCLR projection MLP (Chen et al., ICML 2020): ``(B, in_dim) -> (B, out_dim)``.

    ``num_layers - 1`` blocks of Linear -> BatchNorm -> ReLU, then a plain Linear. The hidden linears have no
    bias when BatchNorm follows, since its shift makes one redundant. ``output_norm`` adds a BatchNorm
    without affine parameters after the last Linear (SimSiam's projector, Chen & He 2021, Sec. 4).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2,
                 batch_norm: bool = True, output_norm: bool = False) -> None:
        super().__init__()
        _check_layers("ProjectionHead", num_layers)
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not output_norm))
        if output_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DINOHead(nn.Module):
    """DINO head (Caron et al., ICCV 2021): MLP -> l2-normalized bottleneck -> weight-normalized prototypes.

    ``forward``: ``(B, in_dim) -> (B, out_dim)`` logits ``z_b . w_k / ||w_k|| * g_k``. The prototype layer is
    :attr:`last_layer` (the engine freezes it early in training by a zero-lr span, see
    :meth:`last_layer_names`). With ``norm_last_layer=True`` every prototype's magnitude ``g_k`` is fixed at 1 and not
    trained, so the logits are cosine similarities, which DINO found stabilizes training.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        _check_layers("DINOHead", num_layers)
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # dim=0: the norm is taken over each output row, i.e. per prototype.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0  # g, (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def last_layer_names(self) -> set[str]:
        """The prototype layer's parameter names: the engine freezes them early in training (DINO)."""
        return {name for name, _ in self.last_layer.named_parameters(prefix="last_layer")}

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, bottleneck_dim)`` unit-norm bottleneck features."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, out_dim)`` prototype logits (before any temperature)."""
        return self.last_layer(self.forward_bottleneck(x))

    def prototypes(self) -> torch.Tensor:
        """``(out_dim, bottleneck_dim)`` prototype directions, each row of unit norm."""
        return F.normalize(self.last_layer.weight, dim=-1)


class IBOTHead(DINOHead):
    """iBOT head (Zhou et al., ICLR 2022): a :class:`DINOHead` whose MLP also projects patch tokens.

    ``forward``: cls features ``(..., in_dim) -> (..., out_dim)`` (local crops); :meth:`forward_tokens`: cls
    and patch features of the global crops together. Both go through the same MLP and bottleneck. With
    ``shared_prototypes`` the patches are scored against the cls prototypes (iBOT's ``shared_head=True``,
    its ViT-S/16 setting; ``patch_out_dim`` must equal ``out_dim``); otherwise against their own
    weight-normalized prototype layer :attr:`patch_last_layer` (iBOT's ``shared_head=False``, which also
    keeps the MLP shared and separates only the prototypes).
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, patch_out_dim: int = 8192, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, norm_last_layer: bool = True,
                 shared_prototypes: bool = True) -> None:
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim, num_layers, norm_last_layer)
        if shared_prototypes and patch_out_dim != out_dim:
            raise ConfigError(f"shared iBOT prototypes need patch_out_dim == out_dim, got {patch_out_dim} and "
                              f"{out_dim}; set them equal or use separate prototypes")
        self.patch_last_layer: nn.Module | None = None
        if not shared_prototypes:
            self.patch_last_layer = weight_norm(nn.Linear(bottleneck_dim, patch_out_dim, bias=False), dim=0)
            magnitude = self.patch_last_layer.parametrizations.weight.original0
            with torch.no_grad():
                magnitude.fill_(1.0)
            magnitude.requires_grad_(not norm_last_layer)

    def last_layer_names(self) -> set[str]:
        """Both prototype layers: iBOT freezes every ``last_layer*`` parameter early in training."""
        names = super().last_layer_names()
        if self.patch_last_layer is not None:
            names |= {name for name, _ in self.patch_last_layer.named_parameters(prefix="patch_last_layer")}
        return names

    def forward_tokens(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototype logits of cls features ``(B, in_dim)`` and patch features ``(..., in_dim)`` (all patches
        ``(B, N, in_dim)``, or only some, ``(M, in_dim)``), in one MLP pass: ``(B, out_dim)`` and
        ``(..., patch_out_dim)`` (before any temperature). The MLP acts on each token alone, so a patch's
        logits do not depend on which other patches are passed."""
        flat = patches.reshape(-1, patches.shape[-1])
        bottleneck = self.forward_bottleneck(torch.cat((cls, flat)))
        patch_layer = self.last_layer if self.patch_last_layer is None else self.patch_last_layer
        patch_logits = patch_layer(bottleneck[len(cls):])
        return self.last_layer(bottleneck[: len(cls)]), patch_logits.view(*patches.shape[:-1], patch_logits.shape[-1])
