"""Median wall time of the phases of a DINO or AB_DINO training step (benchmarks/demo.md, twenty-eighth round).

    python benchmarks/step_phases.py RECIPE OUT_DIR [wildssl train arguments]

For example, one thread::

    OMP_NUM_THREADS=1 python benchmarks/step_phases.py ab_dino_quick /tmp/phases_ab \\
        --data .carry/quick/data/cifar10_1700/train --set train.steps=200 --set eval.knn_every=0 \\
        --set train.progress=false

Runs the CLI's ``train`` with the functions below wrapped in timers and prints, to stderr, the median ms of each
over its calls after the first 50 steps (nested phases are included in the phases that call them):

- the whole training step (:func:`wildssl.train.step.training_step`), the AdamW step, the EMA update;
- DINO's loss forward (views, teacher and student passes, loss) and inside it its crops (``make_views``, with the
  photometric pipeline) and each backbone-plus-head pass (``DINO._logits``, twice a step: teacher and student);
- AB's bootstrap forward and inside it its crops, the crop pairs, the box-query decoder, the teacher's targets
  (``annotation_space``) and the bootstrap loss.

The backward pass is the step less the forward phases, the optimizer and the EMA.
"""

from __future__ import annotations

import collections
import statistics
import sys
import time

import torch

import wildssl.train.engine as engine
from wildssl import cli
from wildssl.methods import ab, base, dino
from wildssl.models import box_decoder

WARMUP = 50
TIMES: dict[str, list[float]] = collections.defaultdict(list)


def timed(owner, name: str, label: str) -> None:
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        TIMES[label].append(time.perf_counter() - start)
        return result

    setattr(owner, name, wrapper)


PHASES = [(engine, "training_step", "step"), (torch.optim.AdamW, "step", "AdamW step"),
          (base.Method, "update_teacher", "EMA update"), (dino.DINO, "forward", "DINO forward"),
          (dino, "make_views", "  DINO crops (with photometric)"), (dino.DINO, "_logits", "  DINO backbone + head pass"),
          (ab.AnnotationBootstrapping, "bootstrap", "AB bootstrap forward"), (ab, "make_views", "  AB crops"),
          (ab, "pack_pairs", "  AB crop pairs"), (box_decoder.AnnotationBootstrapHead, "forward", "  AB decoder"),
          (ab.ABDINO, "annotation_space", "  AB teacher targets"), (ab, "bootstrap_loss", "  AB loss")]


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    for owner, name, label in PHASES:
        timed(owner, name, label)
    recipe, out = sys.argv[1], sys.argv[2]
    sys.argv = ["wildssl", "train", recipe, "--out", out, *sys.argv[3:]]
    code = cli.main()
    steps = len(TIMES["step"])
    for _, _, label in PHASES:
        calls = TIMES.get(label)
        if calls:
            per_step = len(calls) // max(steps, 1)
            measured = calls[WARMUP * per_step:] or calls
            print(f"{label}: median {1000 * statistics.median(measured):.1f} ms, {per_step} a step", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
