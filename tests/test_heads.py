from __future__ import annotations

import pytest
import torch
from torch import nn

from wildssl.errors import ConfigError
from wildssl.models.heads import DINOHead, ProjectionHead


def test_projection_head_matches_linear_batchnorm_relu_formula():
    torch.manual_seed(0)
    head = ProjectionHead(6, hidden_dim=5, out_dim=3, num_layers=2).double().train()
    with torch.no_grad():
        head.layers[1].weight.uniform_(0.5, 1.5)
        head.layers[1].bias.normal_()
    x = torch.randn(8, 6, dtype=torch.float64)
    first, bn, _, last = head.layers
    h = x @ first.weight.T
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    expected = torch.clamp(h, min=0) @ last.weight.T + last.bias
    assert first.bias is None  # redundant before BatchNorm
    torch.testing.assert_close(head(x), expected, rtol=1e-10, atol=1e-10)


def test_projection_head_layer_counts():
    one = ProjectionHead(6, out_dim=3, num_layers=1)
    assert len(one.layers) == 1 and isinstance(one.layers[0], nn.Linear)
    three = ProjectionHead(6, hidden_dim=4, out_dim=3, num_layers=3)
    kinds = [type(m) for m in three.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    plain = ProjectionHead(6, hidden_dim=4, out_dim=3, num_layers=2, batch_norm=False)
    assert [type(m) for m in plain.layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert plain.layers[0].bias is not None
    assert three(torch.randn(4, 6)).shape == (4, 3)
    with pytest.raises(ConfigError):
        ProjectionHead(6, num_layers=0)


def small_dino_head(**kwargs) -> DINOHead:
    args = dict(in_dim=10, out_dim=7, hidden_dim=8, bottleneck_dim=4)
    args.update(kwargs)
    return DINOHead(**args)


def test_dino_head_logits_are_cosine_to_prototypes():
    torch.manual_seed(0)
    head = small_dino_head().double()
    x = torch.randn(5, 10, dtype=torch.float64)
    hidden = x
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for i, linear in enumerate(linears):
        hidden = hidden @ linear.weight.T + linear.bias
        if i < 2:
            hidden = torch.nn.functional.gelu(hidden)
    bottleneck = hidden / hidden.norm(dim=1, keepdim=True)
    direction = head.last_layer.parametrizations.weight.original1
    prototypes = direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head.forward_bottleneck(x), bottleneck)
    torch.testing.assert_close(head(x), bottleneck @ prototypes.T)
    torch.testing.assert_close(head.prototypes(), prototypes)
    torch.testing.assert_close(head.prototypes().norm(dim=1), torch.ones(7, dtype=torch.float64))


def test_dino_head_logits_ignore_prototype_scale_when_last_layer_normalized():
    torch.manual_seed(0)
    head = small_dino_head()
    x = torch.randn(3, 10)
    before = head(x)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.mul_(torch.rand(7, 1) * 10 + 0.1)
    torch.testing.assert_close(head(x), before)
    assert head(x).abs().max() <= 1 + 1e-5


def test_dino_head_magnitude_frozen_only_when_norm_last_layer():
    torch.manual_seed(0)
    frozen = small_dino_head(norm_last_layer=True)
    magnitude = frozen.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    assert torch.equal(magnitude, torch.ones(7, 1))
    frozen(torch.randn(3, 10)).sum().backward()
    assert magnitude.grad is None
    assert frozen.last_layer.parametrizations.weight.original1.grad is not None

    free = small_dino_head(norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_dino_head_last_layer_parameters_are_named_last_layer():
    head = small_dino_head()
    names = [n for n, _ in head.named_parameters() if "last_layer" in n]
    assert len(names) == 2  # magnitude g and direction v
    assert all(p.ndim == 2 and p.shape[0] == 7 for n, p in head.named_parameters() if "last_layer" in n)


def test_dino_head_one_layer_mlp_is_single_linear():
    head = small_dino_head(num_layers=1)
    assert len(head.mlp) == 1 and head.mlp[0].in_features == 10 and head.mlp[0].out_features == 4
    assert head(torch.randn(2, 10)).shape == (2, 7)
