import math
import os
from pathlib import Path

import pytest
import torch

# One thread: tests share 2 cores with other processes, and oversubscribed threads run 10-20x slower.
torch.set_num_threads(1)

# Tests that start a process group (2 processes talking over a local port): pytest-xdist runs them all on
# one worker (--dist loadgroup in pyproject.toml), one at a time, so two groups never race for a port.
PROCESS_GROUP = pytest.mark.xdist_group("process_group")


def pytest_collection_modifyitems(config, items):
    """The end-to-end trainings (marked slow, 20-130 s each) run first, the rest after them in their own order.
    pytest-xdist hands out the first quarter of the tests alternately to its two workers, so the long runs are
    shared between them and the short tests fill the end; in file order one worker could start a 2-minute run last
    while the other sat idle (the suite's wall time, README)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each part


def free_port() -> int:
    """A local TCP port free at this moment, for a test's process group (MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

TINY_DATA = "synthetic:scenes?n=64&size=16&split=train"

TINY_MODEL = ["model.name=tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
              "model.patch_size=4", "model.img_size=16", "data.load_size=16", "data.num_workers=0",
              f"data.train={TINY_DATA}", "train.batch_size=16", "train.log_every=1",
              "train.progress=false", "train.tensorboard=false", "eval.knn_every=0"]

# The one tiny configuration of every method, shared by all tests (recipe "<method>_quick" + these).
TINY_TEXT = ["method.embed_dim=16", "method.text_depth=1", "method.text_width=32", "method.text_heads=2",
             "method.context_length=40", "method.tokenizer=byte", "method.vocab_size=259"]
TINY_DISTILLATION = ["method.global_size=16", "method.local_size=8", "method.n_local=2", "method.out_dim=64",
                     "method.hidden_dim=32", "method.bottleneck_dim=16", "method.teacher_temp_warmup_epochs=1"]
TINY_METHOD = {
    "simclr": ["method.crop_size=16", "method.proj_hidden_dim=32", "method.proj_dim=16"],
    "dino": TINY_DISTILLATION,
    "simsiam": ["method.crop_size=16", "method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=8"],
    "clip": ["method.crop_size=16"] + TINY_TEXT,
    "slip": ["method.crop_size=16", "method.ssl_hidden_dim=32", "method.ssl_dim=16"] + TINY_TEXT,
    "silc": TINY_DISTILLATION + TINY_TEXT,
    "mae": ["method.name=mae", "method.crop_size=16", "method.decoder_dim=32", "method.decoder_depth=1",
            "method.decoder_heads=2"],
    "wsp": ["method.name=wsp", "method.crop_size=16", "method.vocabulary_size=16"],
    "ijepa": ["method.name=ijepa", "method.crop_size=16", "method.min_context=2", "method.predictor_dim=32",
              "method.predictor_depth=1", "method.predictor_heads=2"],
}


def tiny_overrides(method: str, *extra: str) -> list[str]:
    """``--set`` overrides that make ``<method>_quick`` tiny (1 block of width 32 at 16 px, 16 images)."""
    return TINY_MODEL + TINY_METHOD[method] + list(extra)


def tiny_config(method: str, *extra: str) -> dict:
    """The resolved tiny config of ``method`` (see :func:`tiny_overrides`)."""
    from wildssl.train.config import build_config

    return build_config(f"{method}_quick", tiny_overrides(method, *extra))


def tiny_batch(size: int = 8, start: int = 0) -> dict:
    """A collated batch of the tiny synthetic scenes (uint8 16-px images with labels and captions)."""
    from wildssl.data import collate, open_source

    source = open_source(TINY_DATA)
    return collate([source[i] for i in range(start, start + size)])


def schedule_values(method, step: int = 0, total_steps: int = 10, steps_per_epoch: int = 5) -> dict[str, float]:
    """This step's entries of ``method.schedules()``, as the engine hands them to a method (``StepContext.values``)."""
    return {name: float(values[step]) for name, values in method.schedules(total_steps, steps_per_epoch).items()}


TINY_AB = ["method.ab_n_crops=3", "method.ab_crop_size=16", "method.ab_decoder_depth=1",
           "method.ab_decoder_width=32", "method.ab_decoder_heads=2", "method.ab_num_bins=16",
           "data.bootstrap=synthetic:scenes?n=64&size=16&split=test"]


def tiny_ab_overrides(base: str, *extra: str) -> list[str]:
    """A tiny annotation-bootstrapping config over ``base``; annotation stream = the tiny scenes."""
    common = [o.replace("data.train=", "data.annotation=") for o in TINY_MODEL]
    return [f"method.name=ab_{base}"] + common + TINY_METHOD[base] + TINY_AB + list(extra)


def shared_data_dir() -> Path | None:
    """../shared/data beside the repo (or $WILDSSL_SHARED_DATA); None when absent."""
    env = os.environ.get("WILDSSL_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


@pytest.fixture
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data not present")
    return path


# -- end to end: train briefly, then k-NN of the trained encoder vs the same architecture at init --------
# Two colours per scene make colour useless for telling scenes (and captions) apart, so methods must
# learn the shapes; the class of a scene is the shape of its large object (8 classes, chance 12.5%).
E2E_DATA = "synthetic:scenes?n={n}&size=32&colours=2&split={split}"
E2E = ["model.name=tiny", "model.depth=4", "model.embed_dim=128", "model.num_heads=4", "model.patch_size=8",
       "model.img_size=32", "data.load_size=32", "data.num_workers=0", "train.batch_size=64", "train.steps=100",
       "train.log_every=5", "train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false",
       "eval.knn_every=0", "optim.lr=0.001", "optim.lr_batch_reference=null", "optim.warmup_epochs=0.3"]
KNN_MARGIN = 0.05  # top-1 points the trained encoder must gain over its own initialization
# Two blocks instead of E2E's four, for the end-to-end tests that clear the margin with them at every seed they
# cleared it at with four: CLIP, AB_CLIP, DINO, AB_SimCLR (both seeds of its mean), iBOT (its seed 1 is under the goal
# at either depth, as its xfail says), SLIP and SiLC (benchmarks/e2e_seeds.md, 2026-12-02 Intel round). A 2-block run
# takes about 0.6x the time. SimCLR, AB_DINO and SlotMIM keep four: with two they missed the margin at a seed (SimCLR
# +3.6 and AB_DINO +3.4 at seed 1, SlotMIM at seeds 0-2).
TWO_BLOCKS = ["model.depth=2"]
# A 100-step run needs a fast teacher: with the recipes' 0.99+ momentum the targets stay at their
# random initialization for the whole run.
FAST_TEACHER = ["ema.momentum=0.9", "ema.momentum_end=0.9"]

# The self-distillation end-to-end settings (test_end_to_end.py's DINO and AB_DINO; test_ibot.py adds iBOT's patch
# loss).
# dino_quick is tuned for 32-px photos (SimCLR's CIFAR colours on every crop); on the two-colour scenes of the
# end-to-end tests, 100 steps of those settings gain under 1 point. The test pins the DINO paper's colour pipelines, and
# two global crops of 128 images (DINO without multi-crop, as the paper's 2x224 ablation) with the mean patch
# token pooled for the head and the k-NN. Measured at seeds 0 / 1 / 2 (benchmarks/e2e_seeds.md; gain on this
# k-NN set / on a 4x larger one): DINO +6.6 / +8.3, +8.4 / +8.1, +8.4 / +7.4; AB_DINO +6.8 / +9.5, +8.0 / +8.9,
# +8.2 / +6.2. The former setting (2 local crops, batch 64, class token) gave DINO +7.4 / +3.0, +8.6 / +3.8,
# +3.8 / -1.2: a pass at seed 0 resting on the small set's low random floor. Batch 64 with these views gave
# AB_DINO +3.6 at seed 1.
# The head and the lr are pinned to the values these figures were measured with. KoLeo is off: the figures are plain
# DINO's (dino_quick's KoLeo has its own tests in test_koleo.py; its effect on these scenes is in demo.md, ninth round).
DISTILL = ["method.n_local=0", "train.batch_size=128", "method.out_dim=256", "method.hidden_dim=256",
           "method.bottleneck_dim=64", "method.teacher_temp=0.04", "optim.lr=0.002", "method.photometric=dino",
           "method.pool=avg", "eval.pool=avg", "method.koleo_weight=0"] + FAST_TEACHER


def assert_no_collapse(teacher_entropies: list[float], prototypes: int) -> None:
    """Self-distillation's check in a short run, where its loss is no progress measure (at step 0 the student
    equals the teacher, and the loss rises as the teacher's targets spread): the last logged teacher entropy
    is neither near 0 (one-hot collapse) nor near ln K (uniform collapse)."""
    assert 0.05 < teacher_entropies[-1] < 0.99 * math.log(prototypes), teacher_entropies


def xfail_under_goal(method: str, trained: float, initial: float) -> None:
    """Report a k-NN gain under issue 8's +5-point goal as a known gap (xfail), not hidden and not a pass;
    the caller has already asserted that the trained encoder beats its initialization."""
    if trained <= initial + KNN_MARGIN:
        pytest.xfail(f"{method} k-NN gain {100 * (trained - initial):+.1f} points is under the +5 goal (issue 8)")


def train_and_compare_knn(recipe: str, run_dir, *extra: str, metric: str = "loss", pool: str | None = None):
    """Train ``{recipe}_quick`` on two-colour scenes; return the logged values of ``metric`` and the
    k-NN top-1 of the trained encoder and of the same encoder at its initial (random) weights, as the
    method built it (MAE and I-JEPA give it fixed positions); features: ``pool`` (the cls token or the
    mean patch token), by default the config's ``eval.pool``."""
    import json

    from wildssl.methods import get_method_class
    from wildssl.train.config import build_config
    from wildssl.train.engine import train

    first_stream = get_method_class(build_config(f"{recipe}_quick")["method"]["name"]).streams[0]
    data = [f"data.{first_stream}={E2E_DATA.format(n=2000, split='train')}"]
    config = build_config(f"{recipe}_quick", E2E + data + list(extra))
    train(config, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r[metric] for r in records if metric in r]
    return (losses, *knn_of_trained_and_initial(config, run_dir, pool))


def knn_of_trained_and_initial(config: dict, run_dir, pool: str | None = None, memory: int = 1000,
                               test: int = 500) -> tuple[float, float]:
    """k-NN top-1 of the run's trained encoder and of the same encoder at its initial (random) weights, with
    ``memory`` training scenes and ``test`` test scenes (benchmarks/e2e_seeds.py re-measures with more)."""
    from wildssl.eval.evaluate import evaluate_knn
    from wildssl.methods import build_initial_method
    from wildssl.models.loading import CHECKPOINT_NAME, load_encoder

    initial = build_initial_method(config).encoder()  # the trained run's initial weights
    specs = E2E_DATA.format(n=memory, split="train"), E2E_DATA.format(n=test, split="test")
    pool = pool or config["eval"]["pool"]
    trained_knn = evaluate_knn(load_encoder(run_dir / CHECKPOINT_NAME), *specs, image_size=32, pool=pool)["knn_top1"]
    initial_knn = evaluate_knn(initial.eval(), *specs, image_size=32, pool=pool)["knn_top1"]
    return trained_knn, initial_knn


def make_feature_set(cls, labels, *, avg=None, patch=None, grid=None, boxes=None, box_labels=None, masks=None,
                     multi_labels=None, classes=None):
    """A wildssl FeatureSet built from tensors, as the probes receive it from the cache."""
    from wildssl.eval.features import FeatureSet

    n = len(labels)
    if patch is not None and grid is None:
        side = int(round(patch.shape[1] ** 0.5))
        grid = (side, side)
    return FeatureSet(cls=cls.float(), avg=(cls if avg is None else avg).float(),
                      patch=None if patch is None else patch.half(), grid=grid or (1, 1), labels=labels.long(),
                      multi_labels=multi_labels or [[] for _ in range(n)],
                      boxes=boxes or [torch.zeros(0, 4) for _ in range(n)],
                      box_labels=box_labels or [torch.zeros(0, dtype=torch.long) for _ in range(n)],
                      masks=masks, classes=classes, indices=torch.arange(n))
# -- exact resume: a run killed mid-way and resumed against an unbroken one --------------------------------
class Killed(Exception):
    """Stands for the process dying: raised when a chosen step starts, after the loaders prefetched."""


def train_recording_batches(config: dict, run_dir, monkeypatch, resume: bool = False,
                            kill_at: int | None = None) -> dict[int, dict[str, list[int]]]:
    """Train ``config`` into ``run_dir``; returns ``{step: {stream: dataset indices}}`` of the steps run.
    With ``kill_at``, :class:`Killed` is raised when that step starts (nothing of it is done or saved)."""
    import wildssl.train.engine as engine

    seen: dict[int, dict[str, list[int]]] = {}
    original = engine.training_step

    def recording_step(run, batches, step, *args):
        if step == kill_at:
            raise Killed(f"killed at step {step}")
        seen[step] = {name: batch["index"].tolist() for name, batch in batches.items()}
        return original(run, batches, step, *args)

    monkeypatch.setattr(engine, "training_step", recording_step)
    try:
        engine.train(config, run_dir, resume=resume)
    finally:
        monkeypatch.setattr(engine, "training_step", original)
    return seen


def assert_resume_is_exact(config: dict, tmp_path, monkeypatch, kill_at: int) -> dict[int, dict[str, list[int]]]:
    """Kill a run at step ``kill_at``, resume it, and check it against an unbroken run: every step read the
    same samples and the final checkpoints are bit-identical. Returns the unbroken run's batches."""
    import pytest
    from safetensors.torch import load_file

    from wildssl.models.loading import CHECKPOINT_NAME

    straight = train_recording_batches(config, tmp_path / "straight", monkeypatch)
    with pytest.raises(Killed):
        train_recording_batches(config, tmp_path / "broken", monkeypatch, kill_at=kill_at)
    resumed = train_recording_batches(config, tmp_path / "broken", monkeypatch, resume=True)
    first_resumed = min(resumed)
    assert 0 < first_resumed <= kill_at  # resumed from a checkpoint written before the kill, not from scratch
    assert {s: resumed[s] for s in resumed} == {s: straight[s] for s in range(first_resumed, len(straight))}
    a = load_file(str(tmp_path / "straight" / CHECKPOINT_NAME))
    b = load_file(str(tmp_path / "broken" / CHECKPOINT_NAME))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    return straight


# -- a locked encoder for LiT: a short WSP run that separates the scenes' shapes --------------------------
# One object per scene and 4 shapes (chance 25%): in 200 CPU steps a 2 x 64 ViT learns these shapes well above
# its random initialization (k-NN), whereas on the default scenes (1-3 distractors, 8 shapes) its WSP loss
# barely leaves ln 8 (2.08 -> 2.01 in 350 steps) and LiT on it stays near chance (measured; see the tests).
SHAPES_DATA = "synthetic:scenes?n={n}&size=32&colours=2&num_classes=4&distractors=0&split={split}"
SHAPES_MODEL = ["model.name=tiny", "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8",
                "model.img_size=32", "data.load_size=32", "data.num_workers=0", "train.batch_size=64",
                "train.log_every=10", "train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false",
                "eval.knn_every=0", "optim.lr_batch_reference=null", "optim.warmup_epochs=0.3"]
# The tests that read wsp_shapes_run run on one pytest-xdist worker (--dist loadgroup), so the run is made once.
WSP_SHAPES_GROUP = pytest.mark.xdist_group("wsp_shapes")
SHAPES_WSP = SHAPES_MODEL + ["method.labels=manifest", "method.crop_scale=[0.8,1.0]", "train.steps=200",
                             "optim.lr=2e-3", f"data.train={SHAPES_DATA.format(n=2000, split='train')}"]


@pytest.fixture(scope="session")
def wsp_shapes_run(tmp_path_factory):
    """``(run_dir, config)`` of a WSP run (``wsp_quick`` + :data:`SHAPES_WSP`, labels: the scene's shape)
    on one-object 4-shape scenes, trained once per session: the k-NN test of WSP and the LiT zero-shot
    test read it."""
    from wildssl.train.config import build_config
    from wildssl.train.engine import train

    run_dir = tmp_path_factory.mktemp("wsp_shapes")
    config = build_config("wsp_quick", SHAPES_WSP)
    train(config, run_dir)
    return run_dir, config
