"""Training throughput of a method against a bare forward+backward of its networks on the same views.

Run on a GPU (numbers on a CPU mean nothing):

    python benchmarks/throughput.py --recipe dino --batch 128 --steps 30 [--compile] [--json OUT.json]
    python benchmarks/throughput.py --recipe ab_dino --batch 128 --steps 30
    python benchmarks/throughput.py --recipe ibot --batch 128 --steps 30
    python benchmarks/throughput.py --recipe slotmim --batch 128 --steps 30 --set model.name=small

Both measurements run in one process on the same device: (a) the full wildssl step through the engine's
pieces (views built on the device with photometric augmentation, student on 2x224 + 10x96 crops, EMA
teacher on the globals, DINO head with 65536 prototypes, loss, backward, clipping, AdamW, EMA update;
for ab_dino also batch/4 bootstrap images x 4 crops, the teacher on every crop and the packed box-query
decoder; for ibot the same crops with blockwise masks on the globals, patch prototypes and their loss;
for slotmim two overlapping 224 px crops, masks, the teacher on both, RoIAlign of the score maps, slots
and the predictor) and (b) the bare networks: forward + backward of a sum over the encoder's cls tokens
on the same views prepared once beforehand (for ab_dino plus the bootstrap crops' tokens through the
decoder). The ratio (b time)/(a time) is the engine's efficiency figure (goal >= 0.85).
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="dino", choices=("dino", "ab_dino", "ibot", "slotmim"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the harness")
    parser.add_argument("--set", action="append", default=[], help="config override (e.g. a tiny model)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    config = build_config(args.recipe, [f"train.batch_size={args.batch}"] + args.set)
    method = build_method(config).to(device)
    if args.compile:
        method.student["backbone"].compile()
        method.teacher["backbone"].compile()
    optimizer = build_optimizer(method.parameter_groups())
    apply_schedules(optimizer, 1e-4, 0.04, freeze_last_layer=False)
    load = config["data"]["load_size"]
    images = torch.randint(0, 256, (args.batch, 3, load, load), dtype=torch.uint8, device=device)
    batch = {"image": images, "aspect": torch.ones(args.batch, device=device), "caption": [""] * args.batch}
    bootstrap_batch = args.batch // 4
    bootstrap = {"image": images[:bootstrap_batch], "aspect": torch.ones(bootstrap_batch, device=device)}
    batches = {"annotation": batch, "bootstrap": bootstrap} if args.recipe == "ab_dino" else {"train": batch}
    values = {name: float(schedule[-1]) for name, schedule in method.schedules(1000, 100).items()}
    generator = torch.Generator(device=device).manual_seed(0)
    params = [p for p in method.parameters() if p.requires_grad]

    def method_step():
        context = StepContext(0, 1000, generator, values)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = method(batches, context)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.commit_step()
        method.update_teacher(0.996)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    method_time = timed(method_step, args.steps, args.warmup, device)
    method_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    encoder = method.student["backbone"]
    views = make_views(images, method.specs, generator)
    globals_, locals_ = torch.cat([v.images for v in views[:2]]), [v.images for v in views[2:]]
    bare_params = list(encoder.parameters())
    if args.recipe == "ab_dino":
        from wildssl.data.pairs import pack_pairs

        crops = make_views(bootstrap["image"], method.bootstrap_specs, generator)
        crop_images = torch.cat([v.images for v in crops])
        relative = pack_pairs(torch.stack([v.boxes for v in crops], 1),
                              torch.stack([v.flipped for v in crops], 1))["relative_boxes"]
        bare_params += list(method.student["bootstrap"].parameters())

    def bare_step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = encoder(globals_)["cls"].float().sum()
            if locals_:
                loss = loss + encoder(torch.cat(locals_))["cls"].float().sum()
            if args.recipe == "ab_dino":
                tokens = encoder.forward_features(crop_images)
                memory = tokens.view(len(crops), bootstrap_batch, *tokens.shape[1:]).transpose(0, 1)
                loss = loss + method.student["bootstrap"](memory, relative).float().sum()
        loss.backward()
        for p in bare_params:
            p.grad = None

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bare_time = timed(bare_step, args.steps, args.warmup, device)
    bare_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    result = {
        "recipe": args.recipe, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "batch": args.batch,
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
