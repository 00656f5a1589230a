"""AdaSim's share of a DINO step, with a simulated cache of ImageNet-1k's size (1.3M entries).

Builds ``adasim_dino`` with a fake source of ``--cache`` images (no pixels are ever read: the step's
batch is random), fills the cache and ``--window`` epochs of top-K records with random entries (so the
partner choice does its full work), then times on one device:

- ``step``: the DINO step the pair sampler rides on (forward, backward, optimizer), per step;
- AdaSim's own work per step: ``record`` (the blocked top-K of the step's latents against the cache
  and the gather across ranks), ``commit`` (writing the step's cache rows and records), ``hook``
  (choosing this rank's partners), and
  ``epoch_end`` (the per-epoch diagnostics and window push) divided by the steps of an epoch
  (``cache / --global-batch``).

Times are CPU process time on the CPU (robust to other processes sharing the machine; wall time is given
too) and synchronized wall time on a GPU. Prints one JSON line; ``share`` = AdaSim's work / step.
Not counted: AdaSim reads 2B images per step instead of B (the partners), a data-loader cost that workers
hide when they keep up.

    python benchmarks/adasim_overhead.py --device cpu --model small --image-size 224 --batch 8   # CPU now
    python benchmarks/adasim_overhead.py --device cuda --batch 128 --cache-dtype float16         # GPU, owed
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.methods.dino import DINO
from wildssl.train.config import build_config


class FakeSource:
    """A source of ``size`` images that is never read (the benchmark's batches are random)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def class_labels(self):
        return None

    def describe(self) -> str:
        return f"fake source of {self.size} images"


class Clock:
    """CPU process time on the CPU, synchronized wall time on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out-dim", type=int, default=65536, help="DINO prototypes (the recipe's 65536)")
    parser.add_argument("--batch", type=int, default=8, help="this device's batch B")
    parser.add_argument("--global-batch", type=int, default=1024, help="images per step, all ranks (epoch length)")
    parser.add_argument("--cache", type=int, default=1_300_000, help="N, the simulated dataset size")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--cache-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--record-batches", default="",
                        help="comma-separated batch sizes at which to time the top-K pass again, projecting the "
                             "share with the measured per-image step time (the pass reads the whole cache once "
                             "per step, so its cost per image falls with the batch)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = build_config("adasim_dino", [
        f"model.name={args.model}", f"model.patch_size={args.patch_size}", f"model.img_size={args.image_size}",
        "model.drop_path_rate=0.0", f"method.global_size={args.image_size}", f"method.out_dim={args.out_dim}",
        f"method.adasim_window={args.window}", f"method.neighbour_topk={args.topk}",
        f"method.neighbour_cache_dtype={args.cache_dtype}", f"data.load_size={args.image_size}"])
    method = build_method(config).to(device)
    method.prepare({"train": FakeSource(args.cache)}, None)
    cache, window = method.cache, method.window
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # a full cache and full window: the most work every part can do
        for start in range(0, args.cache, 262_144):
            rows = slice(start, start + 262_144)
            block = torch.randn(cache.latents[rows].shape, generator=generator, device=device)
            cache.latents[rows] = F.normalize(block, dim=1).to(cache.latents.dtype)
        cache.filled.fill_(True)
        window.neighbours.random_(0, args.cache, generator=generator)
        window.similarities.uniform_(0, 1, generator=generator)
        window.epochs_seen.fill_(args.window)
    method.train()
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-5)
    schedules = method.schedules(100, 10)
    clock = Clock(device)
    batch_cpu = torch.randperm(args.cache, generator=torch.Generator().manual_seed(1))[: args.batch]

    def batches(step: int) -> dict:
        images = torch.randint(0, 256, (2 * args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(step)).to(device)
        index = torch.cat([batch_cpu, batch_cpu]).to(device)
        return {"train": {"image": images, "aspect": torch.ones(2 * args.batch, device=device), "index": index}}

    def context(step: int) -> StepContext:
        return StepContext(step, 100, torch.Generator(device=device).manual_seed(step),
                           {k: float(v[step]) for k, v in schedules.items()})

    totals = {"step": 0.0, "record": 0.0, "commit": 0.0, "hook": 0.0}
    wall = {"step": 0.0}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(args.warmup + args.steps):
        data = batches(step)
        half = {"train": {k: v[: args.batch] for k, v in data["train"].items()}}
        latents = torch.randn(args.batch, method.student["backbone"].embed_dim, device=device)
        measured = step >= args.warmup
        t0, w0 = clock.now(), time.perf_counter()
        with autocast:
            loss = DINO.forward(method, half, context(step))["loss"]  # the base step alone
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.discard_step()
        t1, w1 = clock.now(), time.perf_counter()
        method._record(data["train"]["index"][: args.batch], data["train"]["index"][args.batch:], latents)
        t2 = clock.now()
        method.commit_step()
        t3 = clock.now()
        method.choose_partners(step, batch_cpu)
        t4 = clock.now()
        if measured:
            totals["step"] += t1 - t0
            wall["step"] += w1 - w0
            totals["record"] += t2 - t1
            totals["commit"] += t3 - t2
            totals["hook"] += t4 - t3
    t0 = clock.now()
    method.on_epoch_end(0)
    epoch_end = clock.now() - t0
    steps_per_epoch = max(args.cache // args.global_batch, 1)
    per_step = {k: v / args.steps for k, v in totals.items()}
    per_step["epoch_end"] = epoch_end / steps_per_epoch
    adasim = per_step["record"] + per_step["commit"] + per_step["hook"] + per_step["epoch_end"]
    projected = {}
    per_image_step = per_step["step"] / args.batch
    for size in [int(b) for b in args.record_batches.split(",") if b]:
        images = torch.randperm(args.cache, generator=torch.Generator().manual_seed(2))[:size].to(device)
        latents = torch.randn(size, method.student["backbone"].embed_dim, device=device)
        method._record(images, images, latents)  # warm-up
        t0 = clock.now()
        for _ in range(args.steps):
            method._record(images, images, latents)
        record = (clock.now() - t0) / args.steps
        method.discard_step()
        # Commit and hook grow with the batch; the epoch-end work per step does not.
        other = (per_step["commit"] + per_step["hook"]) * size / args.batch + per_step["epoch_end"]
        projected[size] = {"record_s": round(record, 5),
                           "share": round((record + other) / (per_image_step * size), 4)}
    print(json.dumps({"device": str(device), "model": args.model, "image_size": args.image_size, "batch": args.batch,
                      "cache": args.cache, "cache_dtype": args.cache_dtype, "window": args.window, "topk": args.topk,
                      "clock": "cpu process time" if device.type == "cpu" else "wall (synchronized)",
                      "seconds_per_step": {k: round(v, 5) for k, v in per_step.items()},
                      "step_wall_s": round(wall["step"] / args.steps, 3), "epoch_end_s": round(epoch_end, 3),
                      "adasim_s": round(adasim, 5), "share": round(adasim / per_step["step"], 4),
                      "projected_by_batch": projected}))


if __name__ == "__main__":
    main()
