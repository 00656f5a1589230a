"""MAWS at scale on one GPU: MAE and WSP training steps of a big ViT with FSDP2 + activation checkpointing.

For each method (MAE, the MAWS pre-pretraining stage; WSP, its second stage) the harness runs the wildssl
engine itself (:func:`wildssl.train.engine.train` on recipe ``maws_mae`` / ``maws_wsp``, with
``train.sharding=fsdp``, ``train.activation_checkpointing=true`` and ``train.precision`` bf16 or fp32) for
``--warmup`` + ``--steps`` steps on rendered synthetic scenes (WSP labels: each scene's shapes), and times
every engine step (``training_step``, between two CUDA synchronizations; the data loaders run ahead in their
workers as in any run). Reported per method: images/s over the timed steps (global batch / mean step time),
the median step time, and ``torch.cuda.max_memory_allocated`` over the whole run (the peak of the first,
warm-up steps included). The run's checkpoint is not written: a ViT-6.5B with AdamW state holds ~78 GB,
more than the disk, and writing it is not what is measured.

Modes:

- default: ``--model`` (``2b``: ViT-2B/14, 24 x 2560, MLP 10240, 32 heads; any of base, large, huge, 2b,
  6.5b; patch 16 for base and large, 14 above, as MAWS) at ``--batch-size`` images per step;
- ``--largest``: each size of ``base, large, huge, 2b, 6.5b`` in its own process (a CUDA out-of-memory
  error leaves nothing behind for the next one), smallest first, until one does not fit; reports the
  largest that ran both steps at that batch size;
- ``--smoke``: on the CPU, a tiny ViT under a single-process gloo group, so that the whole path (FSDP2
  wrapping, checkpointed blocks, timing, JSON) is tested without a GPU; its figures mean nothing.

A plain ``python`` launch makes a process group of one rank; under ``torchrun`` the harness joins the
launched group (several GPUs shard the model between them; the batch is then per rank x ranks).

Usage (the issue-10 measurement, owed until a GPU is lent):
    python benchmarks/maws_fsdp.py --model 2b --batch-size 32 --steps 20 --out benchmarks/maws_fsdp_2b.json
    python benchmarks/maws_fsdp.py --largest --batch-size 32 --steps 5 --out benchmarks/maws_fsdp_largest.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = ("base", "large", "huge", "2b", "6.5b")
PATCH = {"base": 16, "large": 16, "huge": 14, "2b": 14, "6.5b": 14}  # MAWS's ViT-B/16, L/16, H/14, 2B/14, 6.5B/14
METHODS = ("mae", "wsp")
RECIPES = {"mae": "maws_mae", "wsp": "maws_wsp"}

# --smoke: the tests' tiny model (2 blocks of width 64 at 32 px) and tiny method heads.
SMOKE_MODEL = ["model.name=tiny", "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.patch_size=8",
               "model.img_size=32", "data.load_size=32", "method.crop_size=32"]
SMOKE_METHOD = {"mae": ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"], "wsp": []}


def overrides(method: str, model: str, batch_size: int, steps: int, precision: str, smoke: bool) -> list[str]:
    """``--set`` overrides of recipe ``RECIPES[method]`` for a timed run of ``steps`` engine steps."""
    size = 32 if smoke else 224
    common = [f"train.steps={steps}", "train.epochs=null", f"train.batch_size={batch_size}",
              "train.sharding=fsdp", "train.activation_checkpointing=true", f"train.precision={precision}",
              "train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
              "eval.knn_every=0", "optim.warmup_epochs=0", "optim.lr_batch_reference=null",
              f"data.train=synthetic:scenes?n={max(4 * batch_size, 64)}&size={size}&split=train",
              f"data.num_workers={0 if smoke else 'auto'}"]
    if method == "wsp":
        common += ["model.init_from=null", "method.labels=manifest"]  # labels: each scene's shapes, no vocabulary
    if smoke:
        return common + SMOKE_MODEL + SMOKE_METHOD[method]
    return common + [f"model.name={model}", f"model.patch_size={PATCH[model]}", "model.img_size=224",
                     "method.crop_size=224", "data.load_size=224"]


@contextlib.contextmanager
def timed_engine_steps(device: torch.device):
    """Times every call of the engine's ``training_step`` (list of seconds, filled as the run goes) and
    skips the run's checkpoint writes, for the ``with`` block."""
    import wildssl.train.engine as engine

    times: list[float] = []
    original_step, original_save = engine.training_step, engine.save_checkpoint

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_step(*args, **kwargs):
        sync()
        start = time.perf_counter()
        result = original_step(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
        return result

    engine.training_step = timed_step
    engine.save_checkpoint = lambda run, step: None
    try:
        yield times
    finally:
        engine.training_step, engine.save_checkpoint = original_step, original_save


def measure(method: str, args: argparse.Namespace, device: torch.device, out_dir: Path) -> dict:
    """One method's timed run (module docstring): images/s, step times, peak memory."""
    from wildssl import distributed as dist
    from wildssl.train.config import build_config
    from wildssl.train.engine import train

    config = build_config(RECIPES[method], overrides(method, args.model, args.batch_size, args.warmup + args.steps,
                                                     args.precision, args.smoke))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with timed_engine_steps(device) as times:
        summary = train(config, out_dir / method)
    timed = times[args.warmup:]
    global_batch = args.batch_size * dist.get_world_size()
    return {
        "recipe": RECIPES[method],
        "steps_timed": len(timed),
        "warmup_steps": args.warmup,
        "images_per_s": global_batch * len(timed) / sum(timed),
        "step_s_median": statistics.median(timed),
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "final_loss": summary.get("final_loss"),
    }


@contextlib.contextmanager
def process_group(device: torch.device):
    """The launched torchrun group, or a group of this one process (FSDP2 needs one)."""
    import torch.distributed as torch_dist

    if "WORLD_SIZE" in os.environ:
        from wildssl.distributed import cleanup_distributed, setup_distributed

        setup_distributed()
        try:
            yield
        finally:
            cleanup_distributed()
        return
    with tempfile.TemporaryDirectory() as rendezvous:
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                      init_method=f"file://{rendezvous}/rendezvous", rank=0, world_size=1,
                                      device_id=device if device.type == "cuda" else None)
        try:
            yield
        finally:
            torch_dist.destroy_process_group()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def run_one(args: argparse.Namespace) -> dict:
    """Both steps of one model size; ``fits: false`` with the error when CUDA runs out of memory."""
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("maws_fsdp: no CUDA device; this harness measures GPU steps (use --smoke on the CPU)")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    result = {"model": "tiny (smoke)" if args.smoke else args.model, "batch_size": args.batch_size,
              "precision": args.precision, "activation_checkpointing": True, "sharding": "fsdp",
              "device": describe_device(device), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "fits": True, "methods": {}}
    with process_group(device), tempfile.TemporaryDirectory() as out_dir:
        from wildssl import distributed as dist

        result["world_size"] = dist.get_world_size()
        for method in args.methods:
            try:
                result["methods"][method] = measure(method, args, device, Path(out_dir))
            except torch.OutOfMemoryError as error:
                result["fits"] = False
                result["methods"][method] = {"error": f"CUDA out of memory: {str(error).splitlines()[0]}"}
                break
    return result


def run_largest(args: argparse.Namespace) -> dict:
    """Each size in a fresh process, smallest first, until one does not fit (module docstring)."""
    tried = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in SIZES:
            out = Path(scratch) / f"{model}.json"
            command = [sys.executable, __file__, "--model", model, "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
                       "--methods", *args.methods, "--out", str(out)]
            completed = subprocess.run(command, capture_output=True, text=True)
            if out.is_file():
                entry = json.loads(out.read_text())
            else:  # killed before writing (e.g. host memory): counts as not fitting
                entry = {"model": model, "fits": False, "error": completed.stderr.strip().splitlines()[-1:]}
            tried.append(entry)
            if not entry["fits"]:
                break
    fitting = [entry["model"] for entry in tried if entry["fits"]]
    return {"largest_that_fits": fitting[-1] if fitting else None, "batch_size": args.batch_size,
            "precision": args.precision, "tried": tried}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=SIZES, default="2b", help="ViT size (default 2b: ViT-2B/14)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=32, help="images per step and rank")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (allocation, autotuning)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16: bf16 compute, fp32 gradient reduction; fp32: full precision")
    parser.add_argument("--largest", action="store_true", help="try base, large, huge, 2b, 6.5b; report the largest")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny ViT, gloo group: tests the path only")
    parser.add_argument("--out", type=Path, help="write the JSON here (always printed)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1 and --warmup >= 0")
    if args.largest and args.smoke:
        parser.error("--largest measures GPU memory; it has no --smoke form")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run_largest(args) if args.largest else run_one(args)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
