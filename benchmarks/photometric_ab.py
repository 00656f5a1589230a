"""Time the photometric pipelines against their code at an earlier commit, in one process (benchmarks/demo.md,
twenty-eighth round).

    python benchmarks/photometric_ab.py COMMIT [--threads 1] [--batch 64] [--size 32]

Reads ``src/wildssl/data/photometric.py`` as it was at ``COMMIT`` (``git show``), then applies every pipeline of
:data:`wildssl.data.photometric.PIPELINES` to one batch with the same generator seeds through both versions,
alternating which runs first, 300 times each. Prints per pipeline the median ms of the former and the current
code and their ratio, and whether the outputs of the first 20 seeds are bit-identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from wildssl.data import photometric as now

REPEATS, COMPARED = 300, 20


def former_module(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:src/wildssl/data/photometric.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "photometric_former.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("photometric_former", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    former = former_module(args.commit)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for name in sorted(now.PIPELINES):
        times: dict[str, list[float]] = {"former": [], "now": []}
        identical = True
        for i in range(REPEATS):
            order = (("former", former), ("now", now)) if i % 2 else (("now", now), ("former", former))
            outputs = {}
            for label, module in order:
                start = time.perf_counter()
                outputs[label] = module.apply_pipeline(name, x, torch.Generator().manual_seed(i))
                times[label].append(time.perf_counter() - start)
            if i < COMPARED:
                identical = identical and torch.equal(outputs["former"], outputs["now"])
        a, b = (1000 * statistics.median(times[k]) for k in ("former", "now"))
        print(f"{name}: {args.commit[:7]} {a:.2f} ms, now {b:.2f} ms, now/former {b / a:.2f}, "
              f"{'bit-identical' if identical else 'OUTPUTS DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
