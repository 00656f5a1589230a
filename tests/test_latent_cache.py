import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from conftest import PROCESS_GROUP, free_port
from wildssl.methods.latent_cache import LatentCache, blocked_topk
from wildssl.methods.similarity_window import SimilarityWindow


def _buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor (in elements) any torch function returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_blocked_topk_equals_the_dense_topk_for_any_chunk_size(chunk):
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    keys = F.normalize(torch.randn(64, 8, generator=generator), dim=1)
    valid = torch.rand(64, generator=generator) < 0.7
    values, indices = blocked_topk(queries, keys, 4, chunk=chunk, valid=valid)
    dense = (queries.double() @ keys.double().T).masked_fill(~valid, float("-inf"))
    expected_values, expected_indices = dense.topk(4, dim=1)
    assert torch.equal(indices, expected_indices)
    assert (values.double() - expected_values).abs().max() < 1e-6


def test_blocked_topk_marks_missing_neighbours_when_fewer_keys_are_valid():
    keys = torch.eye(4)
    values, indices = blocked_topk(keys[:2], keys, 3, chunk=2, valid=torch.tensor([True, True, False, False]))
    assert indices.tolist() == [[0, 1, -1], [1, 0, -1]]
    assert values.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def test_topk_pass_never_builds_a_batch_by_cache_matrix():
    queries, keys = torch.randn(16, 8), torch.randn(4096, 8)
    with _LargestTensor() as mode:
        blocked_topk(queries, keys, 3, chunk=256)
    assert mode.largest <= 16 * 256  # one block of similarities, not 16 x 4096
    with _LargestTensor() as dense:
        blocked_topk(queries, keys, 3, chunk=4096)
    assert dense.largest == 16 * 4096  # the probe sees a full matrix when there is one


def test_similarity_store_and_cache_memory_grow_linearly_in_the_number_of_images():
    topk, window, dim = 3, 10, 16
    sizes = (1000, 2000)
    windows = [_buffer_bytes(SimilarityWindow(n, topk, window)) for n in sizes]
    caches = [_buffer_bytes(LatentCache(n, dim)) for n in sizes]
    # O(N K w): 8 bytes per (epoch, image, neighbour) in the window plus the running epoch, 2 flags per
    # image, and the completed-epoch counter; nothing grows like N^2.
    for n, measured in zip(sizes, windows):
        assert measured == 8 * n * topk * (window + 1) + 2 * n + 8
    assert windows[1] - 8 == 2 * (windows[0] - 8)
    assert caches[1] == 2 * caches[0] == 2 * 1000 * (4 * dim + 1)


def test_half_precision_cache_finds_the_same_neighbours_as_float32():
    generator = torch.Generator().manual_seed(1)
    latents = F.normalize(torch.randn(40, 8, generator=generator), dim=1)
    queries = F.normalize(latents[:6] + 0.05 * torch.randn(6, 8, generator=generator), dim=1)
    found = []
    for dtype in (torch.float32, torch.float16):
        cache = LatentCache(40, 8, chunk=16, dtype=dtype)
        cache.observe(torch.arange(40), latents)
        cache.commit_step()
        assert cache.latents.dtype == dtype
        found.append(cache.neighbours(queries, 1))
    assert torch.equal(found[0][1], found[1][1]) and found[0][1].squeeze(1).tolist() == list(range(6))
    assert (found[0][0] - found[1][0]).abs().max() < 2e-3


def test_cache_rows_change_only_after_a_committed_step():
    cache = LatentCache(5, 2)
    cache.observe(torch.tensor([1, 3]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    cache.discard_step()
    cache.commit_step()
    assert not cache.filled.any() and not cache.latents.any()
    cache.observe(torch.tensor([1, 3]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    cache.commit_step()
    assert cache.filled.tolist() == [False, True, False, True, False]
    similarities, neighbours = cache.neighbours(torch.tensor([[0.6, 0.8]]), 2)
    assert neighbours.tolist() == [[3, 1]]
    assert (similarities - torch.tensor([[0.8, 0.6]])).abs().max() < 1e-6


# -- 2 ranks: the cache and the records, gathered, equal one process's ------------------------------------
WORLD_SIZE, LOCAL_BATCH, IMAGES, WIDTH, TOPK = 2, 3, 16, 32, 2


def _global_step(step: int):
    """The same global batch on every rank: images, partners and latents (B, width)."""
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randperm(IMAGES, generator=generator)[: WORLD_SIZE * LOCAL_BATCH]
    partners = torch.where(torch.rand(len(images), generator=generator) < 0.5, images, (images + 1) % IMAGES)
    return images, partners, torch.randn(len(images), WIDTH, generator=generator)


def _worker(rank: int) -> None:
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from conftest import TINY_MODEL, TINY_METHOD
    from wildssl.data.synthetic import SyntheticScenes
    from wildssl.distributed import cleanup_distributed, setup_distributed
    from wildssl.methods import build_method
    from wildssl.train.config import build_config

    setup_distributed()
    try:
        config = build_config(None, ["method.name=adasim_dino", f"method.neighbour_topk={TOPK}"]
                              + TINY_MODEL + TINY_METHOD["dino"])
        method = build_method(config)
        method.prepare({"train": SyntheticScenes(n=IMAGES, size=16)}, None)
        # One process, independently: top-K against the cache before the step, then the rows are written.
        latents, filled = torch.zeros(IMAGES, WIDTH), torch.zeros(IMAGES, dtype=torch.bool)
        for step in range(3):
            images, partners, features = _global_step(step)
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            method._record(images[rows], partners[rows], features[rows])
            method.commit_step()
            z = F.normalize(features, dim=1)
            dense = (z @ latents.T).masked_fill(~filled, float("-inf"))
            expected_sims, expected_ids = dense.topk(TOPK, dim=1)
            missing = torch.isinf(expected_sims)
            latents[images], filled[images] = z, True
            assert torch.equal(method.cache.latents, latents) and torch.equal(method.cache.filled, filled)
            window = method.window
            assert torch.equal(window.current_neighbours[images].long(), expected_ids.masked_fill(missing, -1))
            # Each rank's top-K runs its own matmul shape: equal up to float rounding.
            assert (window.current_similarities[images] - expected_sims.masked_fill(missing, 0.0)).abs().max() < 1e-5
            assert torch.equal(window.current_partnered[images], partners != images)
        torch.distributed.barrier()
    finally:
        cleanup_distributed()


@PROCESS_GROUP
def test_two_rank_gloo_cache_updates_equal_the_single_process_cache(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("WORLD_SIZE", str(WORLD_SIZE))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    context = torch.multiprocessing.start_processes(_worker, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("distributed workers did not finish within 120 s")
