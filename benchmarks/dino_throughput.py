"""DINO ViT-S/16 training throughput against a bare forward+backward of the same encoder on the same views.

Run on a GPU (numbers on a CPU mean nothing):

    python benchmarks/dino_throughput.py --batch 128 --steps 30 [--compile] [--json OUT.json]

Both measurements run in one process on the same device: (a) the full wildssl DINO step through the
engine's pieces (views built on the device with photometric augmentation, student on 2x224 + 10x96
crops, EMA teacher on the globals, DINO head with 65536 prototypes, loss, backward, clipping, AdamW, EMA
update) and (b) the bare encoder: forward + backward of a sum over the cls tokens, on views prepared once
beforehand. The ratio (a)/(b) in images/s is the engine's overhead figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from wildssl.data.views import make_views
from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.train.config import build_config
from wildssl.train.optim import apply_schedules, build_optimizer


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    config = build_config("dino", [f"train.batch_size={args.batch}"])
    method = build_method(config).to(device)
    if args.compile:
        method.student["backbone"].compile()
        method.teacher["backbone"].compile()
    optimizer = build_optimizer(method)
    apply_schedules(optimizer, 1e-4, 0.04, freeze_last_layer=False)
    images = torch.randint(0, 256, (args.batch, 3, 256, 256), dtype=torch.uint8, device=device)
    batch = {"image": images, "aspect": torch.ones(args.batch, device=device)}
    generator = torch.Generator(device=device).manual_seed(0)
    params = [p for p in method.parameters() if p.requires_grad]

    def method_step():
        context = StepContext(0, 1000, generator, {"teacher_temp": 0.04})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = method(batch, context)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.update_teacher(0.996)

    torch.cuda.reset_peak_memory_stats()
    method_time = timed(method_step, args.steps, args.warmup)
    method_memory = torch.cuda.max_memory_allocated() / 2**30

    encoder = method.student["backbone"]
    views = make_views(images, method.specs, generator)
    globals_, locals_ = (torch.cat([v.images for v in views[:2]]), torch.cat([v.images for v in views[2:]]))
    bare_params = list(encoder.parameters())

    def bare_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = encoder(globals_)["cls"].float().sum() + encoder(locals_)["cls"].float().sum()
        loss.backward()
        for p in bare_params:
            p.grad = None

    torch.cuda.reset_peak_memory_stats()
    bare_time = timed(bare_step, args.steps, args.warmup)
    bare_memory = torch.cuda.max_memory_allocated() / 2**30
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
        "compile": args.compile, "method_images_per_s": args.batch / method_time,
        "bare_images_per_s": args.batch / bare_time, "ratio": bare_time / method_time,
        "method_peak_gib": method_memory, "bare_peak_gib": bare_memory,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
