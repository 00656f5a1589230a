import math

import pytest
import torch

from conftest import TINY_METHOD, TINY_MODEL
from wildssl.data.synthetic import SyntheticScenes
from wildssl.losses.simsiam_loss import negative_cosine, simsiam_loss
from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.train.config import build_config

TINY_SIMSIAM = ["method.name=simsiam"] + TINY_METHOD["simsiam"]


def test_simsiam_loss_equals_the_papers_symmetrized_negative_cosine_in_float64():
    generator = torch.Generator().manual_seed(0)
    p_a, p_b, z_a, z_b = (torch.randn(5, 7, generator=generator, dtype=torch.float64) for _ in range(4))

    def cosine(u, v):  # written out: sum u v / (|u| |v|)
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    expected = sum(-0.5 * cosine(p_a[b].tolist(), z_b[b].tolist()) - 0.5 * cosine(p_b[b].tolist(), z_a[b].tolist())
                   for b in range(5)) / 5
    assert simsiam_loss(p_a, p_b, z_a, z_b).item() == pytest.approx(expected, rel=1e-6)
    assert negative_cosine(p_a, p_a).item() == pytest.approx(-1.0, abs=1e-6)


def test_simsiam_loss_sends_no_gradient_into_the_target_projections():
    z_a, z_b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    p_a, p_b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    simsiam_loss(p_a, p_b, z_a, z_b).backward()
    assert z_a.grad is None and z_b.grad is None  # stop-gradient: z is a constant target
    assert p_a.grad.abs().sum() > 0 and p_b.grad.abs().sum() > 0


def test_simsiam_step_gives_gradient_to_backbone_projector_and_predictor_and_a_partner_changes_view_b():
    torch.manual_seed(0)
    method = build_method(build_config(None, TINY_MODEL + TINY_SIMSIAM))
    source = SyntheticScenes(n=8, size=16)
    images = torch.stack([source[i]["image"] for i in range(8)])
    batch = {"image": images[:4], "aspect": torch.ones(4)}
    step = StepContext(0, 1, torch.Generator().manual_seed(3))
    loss, metrics, latents = method.loss_and_latents(batch, step)
    loss.backward()
    assert latents.shape == (4, 32) and not latents.requires_grad and metrics["embedding_std"] > 0
    for key in ("backbone", "projector", "predictor"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student[key].parameters()), key
    # The second view comes from the partner when one is given; the first is unchanged.
    plain = method.step_views(batch, torch.Generator().manual_seed(5))
    same = method.step_views({**batch, "partner_image": images[:4], "partner_aspect": torch.ones(4)},
                             torch.Generator().manual_seed(5))
    other = method.step_views({**batch, "partner_image": images[4:], "partner_aspect": torch.ones(4)},
                              torch.Generator().manual_seed(5))
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, same))
    assert torch.equal(other[0].images, plain[0].images) and not torch.equal(other[1].images, plain[1].images)
