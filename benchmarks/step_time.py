"""Median and mean wall time of one training step of a ``wildssl train`` run (steps 50 to the last).

    python benchmarks/step_time.py RECIPE OUT_DIR [wildssl train arguments]

For example (benchmarks/demo.md, twenty-second round: what a DINO and an AB_DINO step cost)::

    python benchmarks/step_time.py ab_dino_quick /tmp/st_ab --data .carry/quick/data/cifar10_1700/train \\
        --set train.steps=300 --set eval.knn_every=0 --set train.progress=false

Runs the CLI's ``train`` with the engine's training step (forward, backward, optimizer, EMA) timed, leaving out
start-up, data loading and evaluation, and prints one line to stderr: the recipe, the median and mean ms of a step
over steps 50 to the end (the first 50 warm up the allocator and the kernels), the median CPU ms of a step (the
process's CPU time: with ``OMP_NUM_THREADS=1`` the step's cost without the time a busy host takes from the machine)
and the whole run's seconds.
"""

from __future__ import annotations

import statistics
import sys
import time

import wildssl.train.engine as engine
from wildssl import cli

WARMUP = 50


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    step_fn = engine.training_step
    times: list[float] = []
    cpu_times: list[float] = []

    def timed_step(*args, **kwargs):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = step_fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        return result

    engine.training_step = timed_step
    recipe, out = sys.argv[1], sys.argv[2]
    sys.argv = ["wildssl", "train", recipe, "--out", out, *sys.argv[3:]]
    start = time.perf_counter()
    code = cli.main()
    measured = times[WARMUP:]
    if not measured:
        print(f"step_time: the run took {len(times)} steps, fewer than the {WARMUP} warm-up steps", file=sys.stderr)
        return code or 1
    print(f"{recipe}: median {1000 * statistics.median(measured):.1f} ms, mean {1000 * statistics.mean(measured):.1f} ms "
          f"a step over steps {WARMUP}-{len(times) - 1}, CPU median {1000 * statistics.median(cpu_times[WARMUP:]):.1f} ms; "
          f"whole run {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
