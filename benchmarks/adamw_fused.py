"""AdamW's update alone on a recipe's parameters: PyTorch's foreach kernel against its fused one, alternating in one
process, and the largest difference between the two after the same steps (benchmarks/demo.md, twenty-ninth round).

    OMP_NUM_THREADS=1 python benchmarks/adamw_fused.py dino_quick ab_dino_quick
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from wildssl.methods import build_initial_method
from wildssl.train.config import build_config

STEPS, WARMUP = 300, 50


def main(recipes: list[str]) -> int:
    for recipe in recipes:
        params = [p for group in build_initial_method(build_config(recipe)).parameter_groups() for p in group["params"]]
        grads = [torch.randn_like(p) for p in params]
        runs = {}
        for fused in (False, True):
            copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
            for copy, grad in zip(copies, grads):
                copy.grad = grad.clone()
            optimizer = torch.optim.AdamW([{"params": copies, "weight_decay": 0.04}], lr=1e-3,
                                          fused=True if fused else None)
            runs[fused] = (copies, optimizer, [])
        for _ in range(STEPS):
            for copies, optimizer, times in runs.values():
                start = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - start)
        foreach, fused = (statistics.median(runs[f][2][WARMUP:]) for f in (False, True))
        gap = max((a - b).abs().max().item() for a, b in zip(runs[False][0], runs[True][0]))
        print(f"{recipe}: {sum(p.numel() for p in params):,} parameters in {len(params)} tensors; foreach "
              f"{1e3 * foreach:.2f} ms, fused {1e3 * fused:.2f} ms ({fused / foreach:.2f}x); largest difference "
              f"after {STEPS} steps {gap:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["dino_quick"]))
