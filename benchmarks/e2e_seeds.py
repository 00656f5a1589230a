"""Run one end-to-end quality test at another seed and measure its k-NN gain twice (benchmarks/e2e_seeds.md).

    python benchmarks/e2e_seeds.py MODULE FUNCTION SEED [PARAM|-] [OVERRIDE ...]

e.g. ``python benchmarks/e2e_seeds.py test_end_to_end test_training_beats_random_init_on_knn 2 dino``.
The test runs as committed (its own assertions decide "status"), with ``train.seed=SEED`` and the overrides
appended to its training config; the seed changes the initial weights, the data order and the crops. Then
the same trained checkpoint and the same random-init encoder are measured again with a 4x larger k-NN set
(memory 4,000 train scenes, test 2,000, against the test's 1,000 / 500). One JSON line on stdout.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
BIG_MEMORY, BIG_TEST = 4000, 2000


def larger_knn(run_dir: Path, pool: str | None) -> tuple[float, float]:
    """k-NN top-1 of the run's trained encoder and of its random initialization on the larger set."""
    import yaml
    from conftest import knn_of_trained_and_initial

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return knn_of_trained_and_initial(config, run_dir, pool, memory=BIG_MEMORY, test=BIG_TEST)


def main(argv: list[str]) -> None:
    module_name, function_name, seed = argv[:3]
    param = argv[3] if len(argv) > 3 and argv[3] != "-" else None
    overrides = argv[4:]
    torch.set_num_threads(1)
    sys.path.insert(0, str(TESTS))
    import conftest

    module = importlib.import_module(module_name)
    seen: dict = {}
    harness = conftest.train_and_compare_knn

    def at_seed(recipe, run_dir, *extra, **kwargs):
        values, trained, initial = harness(recipe, run_dir, *extra, f"train.seed={seed}", *overrides, **kwargs)
        seen.update(run_dir=run_dir, pool=kwargs.get("pool"), trained=trained, initial=initial)
        return values, trained, initial

    module.train_and_compare_knn = at_seed
    start, status = time.time(), "pass"
    try:
        getattr(module, function_name)(Path(tempfile.mkdtemp()), *([param] if param else []))
    except AssertionError as error:
        status = f"fail {error}"[:120]
    except (pytest.xfail.Exception, pytest.skip.Exception) as outcome:  # a known gap or a missing extra
        status = f"{type(outcome).__name__} {outcome}"[:120]
    record = {"test": f"{module_name}::{function_name}" + (f"[{param}]" if param else ""), "seed": int(seed),
              "overrides": overrides, "status": status}
    if "trained" in seen:
        big_trained, big_initial = larger_knn(seen["run_dir"], seen["pool"])
        record.update(knn=[round(seen["trained"], 3), round(seen["initial"], 3)],
                      gain=round(seen["trained"] - seen["initial"], 3),
                      knn_4x=[round(big_trained, 3), round(big_initial, 3)], gain_4x=round(big_trained - big_initial, 3))
    record["seconds"] = round(time.time() - start)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
