"""Time one AdamW update on the CPU over a quick recipe's student parameters (benchmarks/demo.md, nineteenth round).

    python benchmarks/adamw_cpu.py [--recipes dino_quick ab_dino_quick] [--threads 2] [--steps 200]

For each recipe: the number of parameter tensors, then the mean time of one ``optimizer.step()`` with PyTorch's
per-tensor loop (``foreach=False``, what the engine gets on the CPU), ``foreach=True`` and ``fused=True`` (what the
engine sets on CUDA), each after five warm-up steps on the same random gradients, and the largest difference of the
parameters after those five steps from the per-tensor loop's (0 means bit-identical).
"""

from __future__ import annotations

import argparse
import time

import torch

from wildssl.methods import build_method
from wildssl.train.config import build_config

MODES = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def run(recipe: str, steps: int) -> None:
    method = build_method(build_config(recipe))
    params = [p for p in method.student.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(5)]
    print(f"{recipe}: {len(params)} tensors, {sum(p.numel() for p in params)} numbers")
    after_warmup = {}
    for mode, options in MODES.items():
        copies = [p.detach().clone().requires_grad_(True) for p in params]
        optimizer = torch.optim.AdamW([{"params": copies, "weight_decay": 0.04}], lr=1e-3, **options)
        for step in range(steps + 5):
            if step == 5:
                after_warmup[mode] = [p.detach().clone() for p in copies]
                start = time.perf_counter()
            for p, g in zip(copies, grads[step % 5]):
                p.grad = g
            optimizer.step()
        milliseconds = 1000 * (time.perf_counter() - start) / steps
        difference = max((a - b).abs().max().item() for a, b in zip(after_warmup["loop"], after_warmup[mode]))
        print(f"  {mode:8s} {milliseconds:.2f} ms a step; after 5 steps max |difference| from the loop {difference:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["dino_quick", "ab_dino_quick"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for recipe in args.recipes:
        run(recipe, args.steps)


if __name__ == "__main__":
    main()
