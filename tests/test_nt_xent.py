from __future__ import annotations

import math

import pytest
import torch

from wildssl.losses.nt_xent import nt_xent_loss


def reference_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> tuple[float, float]:
    """SimCLR Eq. 1 written out anchor by anchor in float64: (mean loss, top-1 positive accuracy)."""
    z = torch.cat([z_a, z_b]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n = z.shape[0]
    batch = n // 2
    losses, hits = [], 0
    for i in range(n):
        positive = (i + batch) % n
        others = [k for k in range(n) if k != i]
        logits = [float(z[i] @ z[k]) / temperature for k in others]
        top = max(logits)
        log_denominator = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(log_denominator - float(z[i] @ z[positive]) / temperature)
        hits += others[max(range(len(others)), key=lambda idx: logits[idx])] == positive
    return sum(losses) / n, hits / n


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_loss_and_accuracy_equal_anchor_by_anchor_formula(temperature):
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 5), torch.randn(6, 5)
    z_b[:3] = z_a[:3] + 0.1 * torch.randn(3, 5)  # some positives are easy, so accuracy is neither 0 nor 1
    loss, accuracy = nt_xent_loss(z_a, z_b, temperature=temperature, return_accuracy=True)
    expected_loss, expected_accuracy = reference_nt_xent(z_a, z_b, temperature)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy.item() == pytest.approx(expected_accuracy)
    assert 0 < expected_accuracy < 1


def test_float64_inputs_match_formula_to_double_precision():
    torch.manual_seed(1)
    z_a, z_b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    loss = nt_xent_loss(z_a, z_b, temperature=0.2)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(reference_nt_xent(z_a, z_b, 0.2)[0], rel=1e-12)


def test_gather_without_process_group_equals_local_loss():
    torch.manual_seed(2)
    z_a, z_b = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.equal(nt_xent_loss(z_a, z_b, gather=True), nt_xent_loss(z_a, z_b, gather=False))


def test_loss_is_invariant_to_embedding_scale():
    torch.manual_seed(3)
    z_a, z_b = torch.randn(4, 6), torch.randn(4, 6)
    scale = torch.rand(4, 1) * 10 + 0.1
    torch.testing.assert_close(nt_xent_loss(z_a * scale, z_b), nt_xent_loss(z_a, z_b))


def test_gradient_matches_finite_differences():
    torch.manual_seed(4)
    z_a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, temperature=0.3), (z_a, z_b))


def test_identical_views_far_apart_give_perfect_accuracy_and_near_minimal_loss():
    z = torch.eye(4) * 3.0  # orthogonal images, both views equal
    loss, accuracy = nt_xent_loss(z, z.clone(), temperature=0.05, return_accuracy=True)
    assert accuracy.item() == 1.0
    # Each anchor: positive logit 1/t, six negatives at 0 -> loss = log(1 + 6 exp(-1/t)).
    assert loss.item() == pytest.approx(math.log(1 + 6 * math.exp(-20.0)), abs=1e-6)


def test_mismatched_view_shapes_raise():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent_loss(torch.randn(4, 3), torch.randn(5, 3))
