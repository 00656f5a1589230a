from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import PROCESS_GROUP, free_port
import wildssl.losses.nt_xent as nt_xent_module
from wildssl.errors import ConfigError
from wildssl.losses.dino_loss import DINOCenter, sinkhorn_knopp_probabilities
from wildssl.losses.nt_xent import nt_xent_loss
from wildssl.losses.slot_loss import matched_slots, slot_contrastive_loss
from wildssl import distributed
from wildssl.distributed import (
    all_gather_no_grad,
    all_reduce_mean,
    cleanup_distributed,
    gather_with_grad,
    get_rank,
    get_world_size,
    setup_distributed,
)

WORLD_SIZE = 2
LOCAL_BATCH = 3
TEMPERATURE = 0.2


def reference_per_anchor_losses(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR Eq. 1 for every anchor of a single-process batch, float64: (2N,) ordered [view a, view b]."""
    z = F.normalize(torch.cat([z_a, z_b]).double(), dim=1)
    n = z.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    positive = (torch.arange(n) + n // 2) % n
    return torch.logsumexp(logits, dim=1) - logits[torch.arange(n), positive]


def _plain_gather(x: torch.Tensor) -> torch.Tensor:
    """The common mistake: other ranks' rows arrive without gradient; only the local slice keeps it."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _ddp_average(grad: torch.Tensor) -> torch.Tensor:
    """What DistributedDataParallel does to parameter gradients: the mean over ranks."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def _worker(rank: int) -> None:
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    got_rank, world_size, local_rank, device = setup_distributed()
    try:
        assert (got_rank, world_size, local_rank, device.type) == (rank, WORLD_SIZE, rank, "cpu")
        assert (get_rank(), get_world_size(), dist.get_backend()) == (rank, WORLD_SIZE, "gloo")
        _check_nt_xent(rank)
        _check_collectives(rank)
        _check_slot_loss(rank)
        # No rank may tear the group down while the other still talks to it (gloo then aborts the process).
        dist.barrier()
    finally:
        cleanup_distributed()


def _check_nt_xent(rank: int) -> None:
    # Every rank draws the same global batch and the same projection, then keeps its own rows.
    generator = torch.Generator().manual_seed(0)
    global_batch = WORLD_SIZE * LOCAL_BATCH
    x_a = torch.randn(global_batch, 5, generator=generator, dtype=torch.float64)
    x_b = torch.randn(global_batch, 5, generator=generator, dtype=torch.float64)
    projection = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)

    # Single process on the full batch.
    full_a = (x_a @ projection).detach().requires_grad_()
    full_b = (x_b @ projection).detach().requires_grad_()
    full_loss = nt_xent_loss(full_a, full_b, TEMPERATURE, gather=False)
    full_loss.backward()
    per_anchor = reference_per_anchor_losses(full_a.detach(), full_b.detach(), TEMPERATURE)
    assert full_loss.item() == pytest.approx(per_anchor.mean().item(), rel=1e-12)
    single_projection = projection.clone().requires_grad_()
    nt_xent_loss(x_a @ single_projection, x_b @ single_projection, TEMPERATURE, gather=False).backward()

    # This rank, gathering across ranks.
    local_a = full_a.detach()[rows].clone().requires_grad_()
    local_b = full_b.detach()[rows].clone().requires_grad_()
    local_loss = nt_xent_loss(local_a, local_b, TEMPERATURE)
    local_loss.backward()
    anchors = torch.cat([per_anchor[:global_batch][rows], per_anchor[global_batch:][rows]])
    assert local_loss.item() == pytest.approx(anchors.mean().item(), rel=1e-12)
    assert all_reduce_mean(local_loss).item() == pytest.approx(full_loss.item(), rel=1e-12)
    # Backward through the gather returns W x (d full_loss / d local rows); DDP's averaging divides by W.
    torch.testing.assert_close(local_a.grad / WORLD_SIZE, full_a.grad[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(local_b.grad / WORLD_SIZE, full_b.grad[rows], rtol=1e-10, atol=1e-12)

    # A shared parameter, as under DDP: the averaged gradient equals the single-process gradient ...
    shared = projection.clone().requires_grad_()
    nt_xent_loss(x_a[rows] @ shared, x_b[rows] @ shared, TEMPERATURE).backward()
    torch.testing.assert_close(_ddp_average(shared.grad), single_projection.grad, rtol=1e-10, atol=1e-12)

    # ... and with a gather that drops the other ranks' gradients the same check fails (same loss value).
    nt_xent_module.gather_with_grad = _plain_gather
    try:
        broken = projection.clone().requires_grad_()
        broken_loss = nt_xent_loss(x_a[rows] @ broken, x_b[rows] @ broken, TEMPERATURE)
        broken_loss.backward()
    finally:
        nt_xent_module.gather_with_grad = gather_with_grad
    assert broken_loss.item() == pytest.approx(local_loss.item(), rel=1e-12)
    error = (_ddp_average(broken.grad) - single_projection.grad).norm() / single_projection.grad.norm()
    assert error > 0.05, f"a no-grad gather should give a wrong gradient, relative error only {error}"


def _check_collectives(rank: int) -> None:
    assert all_reduce_mean(torch.tensor(float(rank + 1))).item() == pytest.approx(1.5)
    assert all_reduce_mean(torch.tensor(rank)).item() == pytest.approx(0.5)

    local = torch.arange(6, dtype=torch.float32).view(3, 2) + 10 * rank
    expected = torch.cat([torch.arange(6, dtype=torch.float32).view(3, 2) + 10 * r for r in range(WORLD_SIZE)])
    assert torch.equal(all_gather_no_grad(local), expected)
    with pytest.raises(ValueError, match="equal shapes"):
        all_gather_no_grad(torch.zeros(2 + rank, 2))

    # The DINO center moves towards the mean over the global batch, identically on every rank.
    generator = torch.Generator().manual_seed(1)
    teacher_logits = torch.randn(WORLD_SIZE * 4, 7, generator=generator)
    center = DINOCenter(7, momentum=0.75)
    center.center.fill_(1.0)
    center.observe(teacher_logits[rank * 4 : (rank + 1) * 4])
    center.commit_step()
    torch.testing.assert_close(center.center, 0.75 + 0.25 * teacher_logits.mean(dim=0, keepdim=True))

    # Sinkhorn-Knopp centering (DINOv2) balances the prototypes over the global batch: each rank's rows
    # equal the single-process result on all ranks' rows (the ranks' maxima differ: rank 1's are larger).
    logits = torch.randn(WORLD_SIZE * 4, 7, generator=generator) + torch.arange(WORLD_SIZE).repeat_interleave(4)[:, None]
    local = sinkhorn_knopp_probabilities(logits[rank * 4 : (rank + 1) * 4], 0.1)
    torch.testing.assert_close(all_gather_no_grad(local), _single_process_sinkhorn(logits, 0.1), rtol=1e-5, atol=1e-7)


def _single_process_sinkhorn(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Three alternating scalings in float64: prototype totals to 1/K, then crop totals to 1/N; times N."""
    q = torch.exp(logits.double() / temperature)
    q = q / q.sum()
    crops, prototypes = q.shape
    for _ in range(3):
        q = q / (prototypes * q.sum(dim=0, keepdim=True))
        q = q / (crops * q.sum(dim=1, keepdim=True))
    return (q * crops).float()


def _check_slot_loss(rank: int) -> None:
    """SlotMIM's slot loss: the candidates are the active teacher slots of the global batch and each query's
    positive is its own slot, found across ranks; a rank without queries still joins the gather."""
    generator = torch.Generator().manual_seed(2)
    batch, slots, width = 2, 3, 4
    keys = torch.randn(WORLD_SIZE * batch, slots, width, generator=generator, dtype=torch.float64)
    key_active = torch.rand(WORLD_SIZE * batch, slots, generator=generator) < 0.7
    query_active = torch.rand(WORLD_SIZE * batch, slots, generator=generator) < 0.7
    queries = torch.randn(WORLD_SIZE * batch, slots, width, generator=generator, dtype=torch.float64)
    rows = slice(rank * batch, (rank + 1) * batch)
    candidates = F.normalize(keys[key_active], dim=-1)
    for no_queries_on_rank_1 in (False, True):
        local_query_active = query_active[rows] & (not (no_queries_on_rank_1 and rank == 1))
        index = matched_slots(local_query_active, key_active[rows])
        local_queries = queries[rows].flatten(0, 1)[index]
        loss = slot_contrastive_loss(local_queries, index, keys[rows], key_active[rows], TEMPERATURE)
        if len(index) == 0:
            assert loss.item() == 0.0
            continue
        positive = [int(key_active.flatten()[: rank * batch * slots + i].sum()) for i in index.tolist()]
        logits = F.normalize(local_queries, dim=-1) @ candidates.T / TEMPERATURE
        expected = 2 * TEMPERATURE * F.cross_entropy(logits, torch.tensor(positive))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@PROCESS_GROUP
def test_two_rank_gloo_nt_xent_matches_single_process_loss_and_gradient(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("WORLD_SIZE", str(WORLD_SIZE))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the workers stay on CPU with gloo even on a GPU host
    context = torch.multiprocessing.start_processes(_worker, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    # join() re-raises a worker's exception with its traceback; the deadline guards against a hung collective.
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("distributed workers did not finish within 120 s")


def test_single_process_helpers_are_identities(monkeypatch):
    assert not distributed.is_distributed()
    assert (get_rank(), get_world_size(), distributed.is_main_process()) == (0, 1, True)
    distributed.barrier()
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert torch.equal(all_gather_no_grad(x), x.detach())
    mean = all_reduce_mean(x)
    assert torch.equal(mean, x.detach()) and not mean.requires_grad

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    rank, world_size, local_rank, _ = setup_distributed()
    assert (rank, world_size, local_rank) == (0, 1, 0)
    assert not distributed.is_distributed()
    cleanup_distributed()


@pytest.mark.parametrize(
    "env",
    [{"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "0"}],
)
def test_setup_rejects_inconsistent_launcher_environment(monkeypatch, env):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError):
        setup_distributed()


@PROCESS_GROUP
def test_cleanup_leaves_gloo_threads_time_with_the_gil_free_before_it_destroys_the_group(monkeypatch, tmp_path):
    # The group's destructor joins gloo's worker threads with the GIL held; a thread still letting go of a finished
    # collective whose tensors Python freed needs the GIL, and the process deadlocked at exit (2 in 4 loaded runs of
    # the two-process DDP test). cleanup_distributed must sleep (releasing the GIL) before it destroys the group.
    events = []
    destroy = dist.destroy_process_group
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (events.append(("destroy",)), destroy())[1])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        cleanup_distributed()
    finally:
        if dist.is_initialized():
            destroy()
    assert events == [("sleep", distributed.GLOO_DRAIN_SECONDS), ("destroy",)]
    assert distributed.GLOO_DRAIN_SECONDS >= 0.05
    assert not dist.is_initialized()
