"""Op-level CPU profile of 60 training steps (steps 100-159) of a ``wildssl train`` run.

    python benchmarks/op_profile.py RECIPE OUT_DIR [wildssl train arguments]

For example (benchmarks/demo.md, twentieth round: what an AB_DINO step costs against DINO's)::

    python benchmarks/op_profile.py ab_dino_quick /tmp/prof_ab --data .carry/quick/data/cifar10_1700/train \\
        --set train.steps=161 --set eval.knn_every=0 --set train.progress=false

Runs the CLI's ``train`` with the engine's training step wrapped in ``torch.profiler`` over steps 100-159 and
prints the table of ops by self CPU time (ms over the 60 steps) to stderr.
"""

from __future__ import annotations

import sys

import torch

import wildssl.train.engine as engine
from wildssl import cli

FIRST, LAST = 100, 159


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    step_fn = engine.training_step
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def profiled_step(run, batches, step, *args, **kwargs):
        if step == FIRST:
            profiler.__enter__()
        result = step_fn(run, batches, step, *args, **kwargs)
        if step == LAST:
            profiler.__exit__(None, None, None)
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40), file=sys.stderr)
        return result

    engine.training_step = profiled_step
    recipe, out = sys.argv[1], sys.argv[2]
    sys.argv = ["wildssl", "train", recipe, "--out", out, *sys.argv[3:]]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
