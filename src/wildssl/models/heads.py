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
