"""Time the mask draws of one masked-modeling step on the CPU (benchmarks/masked.md, "Mask draws").

    python benchmarks/mask_speed.py [--repeats 5]

Four cases: iBOT's blockwise masks (mask probability 0.5, ratio U[0.1, 0.5]) of the 1,024 global crops of a
512-image step at 224 px (14 x 14 patches) and of the 64 crops of ``ibot_quick``'s 32-image step (4 x 4), and
I-JEPA's multi-block masks of 1,024 images at 224 px and of ``ijepa_quick``'s 64 (4 x 4). The median wall time of
``--repeats`` draws each, in milliseconds, one line per case. To compare two checkouts, run it under each in turn
(``PYTHONPATH=OTHER/src python benchmarks/mask_speed.py``); the first column says which code ran.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import wildssl
from wildssl.data.masking import multiblock_masks
from wildssl.methods.ibot import ibot_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    cases = {
        "ibot_masks, 1,024 crops, 14 x 14": lambda: ibot_masks(1024, (14, 14), (0.1, 0.5), generator, 0.5),
        "ibot_masks, 64 crops, 4 x 4": lambda: ibot_masks(64, (4, 4), (0.1, 0.5), generator, 0.5),
        "multiblock_masks, 1,024 images, 14 x 14": lambda: multiblock_masks(1024, (14, 14), generator),
        "multiblock_masks, 64 images, 4 x 4": lambda: multiblock_masks(64, (4, 4), generator),
    }
    code = wildssl.__file__.rsplit("/src/", 1)[0]
    for name, draw in cases.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            draw()
            times.append(time.perf_counter() - start)
        print(f"{code}  {name:40s} {1e3 * statistics.median(times):8.1f} ms", flush=True)


if __name__ == "__main__":
    main()
