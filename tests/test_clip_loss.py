from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import PROCESS_GROUP, free_port
import wildssl.losses.clip_loss as clip_module
from wildssl.losses.clip_loss import clip_accuracy, clip_loss
from wildssl.models.logit_scale import LogitScale


def reference_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Radford et al. 2021 Fig. 3 written out with loops in float64."""
    image = image.double()
    text = text.double()
    image = image / image.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    n = image.shape[0]
    image_to_text = 0.0
    text_to_image = 0.0
    for i in range(n):
        row = torch.stack([scale * image[i].dot(text[j]) for j in range(n)])
        image_to_text += torch.logsumexp(row, 0) - row[i]
        col = torch.stack([scale * text[i].dot(image[j]) for j in range(n)])
        text_to_image += torch.logsumexp(col, 0) - col[i]
    return (image_to_text / n + text_to_image / n) / 2


def test_clip_loss_matches_float64_loop_formula_both_directions():
    generator = torch.Generator().manual_seed(0)
    for scale in (1.0, 14.3, 100.0):
        image = torch.randn(6, 5, generator=generator)
        text = torch.randn(6, 5, generator=generator)
        got = clip_loss(image, text, torch.tensor(scale), gather=False)
        assert torch.allclose(got.double(), reference_clip_loss(image, text, scale), rtol=1e-5, atol=1e-5)


def test_clip_loss_is_the_mean_of_two_directions_that_differ():
    generator = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    scale = torch.tensor(3.0)
    logits = scale * torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    labels = torch.arange(5)
    image_to_text = torch.nn.functional.cross_entropy(logits, labels)
    text_to_image = torch.nn.functional.cross_entropy(logits.T, labels)
    # The directions differ on random inputs, so a loss using one of them twice cannot pass.
    assert not torch.allclose(image_to_text, text_to_image, atol=1e-3)
    got = clip_loss(image, text, scale, gather=False)
    assert torch.allclose(got, (image_to_text + text_to_image) / 2, atol=1e-6)
    assert torch.allclose(got, clip_loss(text, image, scale, gather=False), atol=1e-6)


def test_clip_loss_ignores_embedding_norms():
    generator = torch.Generator().manual_seed(2)
    image, text = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    scales = torch.rand(4, 1, generator=generator) * 10 + 0.1
    scale = torch.tensor(5.0)
    rescaled = clip_loss(image * scales, text, scale, gather=False)
    assert torch.allclose(clip_loss(image, text, scale, gather=False), rescaled)


def test_clip_loss_keeps_fp32_logits_under_bf16_autocast():
    generator = torch.Generator().manual_seed(3)
    image, text = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    scale = torch.tensor(100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = clip_loss(image.bfloat16(), text.bfloat16(), scale, gather=False)
    want = reference_clip_loss(image.bfloat16().float(), text.bfloat16().float(), 100.0)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-4


def test_logit_scale_starts_at_one_over_0_07_and_its_parameter_is_clamped_to_0_ln100_after_a_step():
    scale = LogitScale()
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert scale.log_scale.dim() == 0
    with torch.no_grad():
        scale.log_scale.fill_(math.log(1000.0))
    scale.commit_step()
    assert scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        scale.log_scale.fill_(-1.0)
    scale.commit_step()
    assert scale.log_scale.item() == 0.0


def test_a_logit_scale_above_100_gets_the_gradient_that_brings_it_back_down():
    # Past ln 100 an output clamp gives exactly zero gradient, so the parameter can never come back.
    generator = torch.Generator().manual_seed(5)
    image, text = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    module = LogitScale()
    with torch.no_grad():
        module.log_scale.fill_(math.log(150.0))
    clip_loss(image, text, module(), gather=False).backward()
    t = module.log_scale.item()
    eps = 1e-4
    expected = (reference_clip_loss(image, text, math.exp(t + eps)) -
                reference_clip_loss(image, text, math.exp(t - eps))) / (2 * eps)
    assert abs(expected.item()) > 1e-3
    assert module.log_scale.grad.item() == pytest.approx(expected.item(), rel=1e-3)


def test_gradient_reaches_the_logit_scale_parameter_and_matches_finite_difference():
    generator = torch.Generator().manual_seed(4)
    image, text = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    module = LogitScale()
    loss = clip_loss(image, text, module(), gather=False)
    loss.backward()
    grad = module.log_scale.grad
    assert grad is not None and grad.item() != 0.0
    t = module.log_scale.item()
    eps = 1e-4
    plus = reference_clip_loss(image, text, math.exp(t + eps))
    minus = reference_clip_loss(image, text, math.exp(t - eps))
    assert grad.item() == pytest.approx(((plus - minus) / (2 * eps)).item(), rel=1e-3, abs=1e-5)


def test_clip_accuracy_counts_images_whose_best_text_is_their_own():
    text = torch.eye(4)
    image = torch.eye(4)[[0, 1, 3, 2]]  # rows 2 and 3 point at each other's text
    assert clip_accuracy(image, text).item() == pytest.approx(0.5)
    assert clip_accuracy(text, text).item() == pytest.approx(1.0)


def test_per_rank_losses_with_global_label_offsets_average_to_the_global_loss(monkeypatch):
    # Simulate world_size ranks in one process: each "rank" sees the global batch as the gather result.
    world, batch, dim = 3, 4, 5
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(world * batch, dim, generator=generator)
    text = torch.randn(world * batch, dim, generator=generator)
    scale = torch.tensor(7.0)
    global_loss = reference_clip_loss(image, text, 7.0)
    losses = []
    for rank in range(world):
        rows = slice(rank * batch, (rank + 1) * batch)
        calls = iter([torch.nn.functional.normalize(image, dim=1), torch.nn.functional.normalize(text, dim=1)])
        monkeypatch.setattr(clip_module, "gather_with_grad", lambda x, calls=calls: next(calls))
        monkeypatch.setattr(clip_module, "get_rank", lambda rank=rank: rank)
        losses.append(clip_loss(image[rows], text[rows], scale, gather=True))
    assert torch.allclose(torch.stack(losses).mean().double(), global_loss, atol=1e-5)


def _distributed_worker(rank: int, world: int, port: int, image, text, results) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = image.shape[0] // world
        rows = slice(rank * batch, (rank + 1) * batch)
        local_image = image[rows].clone().requires_grad_(True)
        local_text = text[rows].clone().requires_grad_(True)
        log_scale = torch.tensor(math.log(9.0), requires_grad=True)
        loss = clip_loss(local_image, local_text, log_scale.exp(), gather=True)
        loss.backward()
        # Plain lists: tensors would travel through the manager as shared-memory handles.
        results[rank] = (loss.item(), local_image.grad.tolist(), local_text.grad.tolist(), log_scale.grad.item())
        # No rank may tear the group down while the other still talks to it (gloo then aborts the process).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@PROCESS_GROUP
def test_two_process_gloo_loss_and_ddp_averaged_gradients_equal_single_process():
    world, batch, dim = 2, 3, 4
    generator = torch.Generator().manual_seed(6)
    image = torch.randn(world * batch, dim, generator=generator)
    text = torch.randn(world * batch, dim, generator=generator)
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(
        _distributed_worker, args=(world, free_port(), image, text, results), nprocs=world, start_method="spawn"
    )

    single_image = image.clone().requires_grad_(True)
    single_text = text.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(9.0), requires_grad=True)
    single = clip_loss(single_image, single_text, log_scale.exp(), gather=False)
    single.backward()

    losses = torch.tensor([results[r][0] for r in range(world)])
    assert torch.allclose(losses.mean(), single, atol=1e-6)
    # DDP divides summed gradients by world size; the gather's backward must supply the cross-rank terms.
    image_grad = torch.tensor([row for r in range(world) for row in results[r][1]]) / world
    text_grad = torch.tensor([row for r in range(world) for row in results[r][2]]) / world
    scale_grad = torch.tensor(sum(results[r][3] for r in range(world)) / world)
    assert torch.allclose(image_grad, single_image.grad, atol=1e-6)
    assert torch.allclose(text_grad, single_text.grad, atol=1e-6)
    assert torch.allclose(scale_grad, log_scale.grad, atol=1e-6)
