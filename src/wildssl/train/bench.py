"""``wildssl bench``: where a training step's time goes, measured in one process and one run.

Four figures of one recipe on the device at hand (CPU or GPU), and two ratios:

(a) **pipeline**: the data pipeline alone from the configured files: the run's own loaders (read, decode,
    resize in ``data.num_workers`` processes, collate), the transfer to the device and the method's views
    built there, in images/s; per core as images per CPU-second of the process and its loader workers.
    Beside it, **decode**: read + decode + resize of single images in this process, per CPU-second and per
    second; with ``data.decode: gpu`` the files are read here and decoded on the device in batches of
    ``train.batch_size`` (:mod:`wildssl.data.gpu_decode`), which is the figure to hold against the CPU's
    per core.
(b) **bare**: the network work the method needs, and nothing else. One real step of the method is run
    with every encoder of the method (its ViT backbones and text towers, :data:`ENCODERS`) recorded
    (:func:`record_backbone_calls`): which network (its path, e.g. ``student.backbone``,
    ``teacher.backbone``, ``student.text``), the inputs, the keyword arguments (``mask``, ``keep_indices``,
    ``keep_valid``), whether gradients were on. Those calls are replayed on the recorded tensors, prepared
    beforehand: the calls made with gradients forward and then backward (from the sum of their outputs),
    the others (the EMA teacher's) forward only. Heads, predictors and decoders count as the step's
    overhead.
(c) **step**: the engine's guarded training step (:func:`wildssl.train.step.training_step`: forward,
    backward, clipping, the one flag read, optimizer, pending state, EMA) on fixed batches on the device.
    (b) and (c) are timed in turn, one call of each per round, and each figure is the median of its
    rounds: on a shared machine a passing load then falls on both alike.
(d) **memory**: the peak during the warm-up calls of (b) and of (c): CUDA's max allocated bytes on a GPU;
    on the CPU the rise of the process's resident set above its level before the phase (Linux ``VmHWM``
    after resetting it through ``/proc/self/clear_refs``, with freed heap returned to the system first).

Ratios: ``step_over_bare`` = (c)/(b) in images/s (1.0: the step costs no more than its networks; the
issue's goal on a GPU is >= 0.85) and ``pipeline_over_step`` = (a)/(c) (>= 1: the data keeps up).
A figure measured on a CPU is no performance claim; the ratios are what it is for.
"""

from __future__ import annotations

import ctypes
import datetime
import inspect
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wildssl.data.gpu_decode import JpegBytes
from wildssl.data.sample import collate
from wildssl.data.views import CropSpec, make_views
from wildssl.data.workers import resolve_num_workers
from wildssl.errors import ConfigError
from wildssl.methods.base import Method
from wildssl.models.text import TextTransformer
from wildssl.models.vit import VisionTransformer
from wildssl.schema import MAX_STEPS
from wildssl.train.run import Run, build_run, compile_networks, make_loaders
from wildssl.train.step import autocast_context, device_batches, training_step

MIB = 2**20
# The encoders whose calls (b) replays, and the method each runs its blocks in: a method calls the module
# (``backbone(x, mask=...)``, ``text(tokens)``) or that method directly (MAE's and AB's
# ``backbone.forward_features(x, keep_indices=...)``, CLIP's ``text.pooled_features``, which runs
# ``forward_tokens``). Heads, predictors and decoders are not encoders: their cost is the step's overhead.
ENCODERS: dict[type, str] = {VisionTransformer: "forward_features", TextTransformer: "forward_tokens"}


@dataclass
class BackboneCall:
    """One call of an encoder (a ViT backbone or a text tower) during a method step, its inputs kept."""

    network: str  # the encoder's path in the method: "student.backbone", "teacher.backbone", "student.text"
    entry: str  # "forward" (the module was called) or the name of the method called directly
    inputs: torch.Tensor  # detached copy of the step's views (B, C, H, W) or token ids (B, L)
    kwargs: dict[str, torch.Tensor]  # the keyword arguments given (mask, keep_indices, keep_valid), copies
    grad: bool  # gradients were enabled: the step backpropagates through this call

    def describe(self) -> dict:
        return {"network": self.network, "entry": self.entry, "input": list(self.inputs.shape),
                "kwargs": {name: list(value.shape) for name, value in self.kwargs.items()}, "grad": self.grad}


def encoders(method: Method) -> dict[str, nn.Module]:
    """The method's encoders by path (``student.backbone``, ``teacher.backbone``, ``student.text``, ...)."""
    return {name: module for name, module in method.named_modules() if type(module) in ENCODERS}


@contextmanager
def record_backbone_calls(method: Method) -> Iterator[list[BackboneCall]]:
    """Record every call of every encoder of ``method`` (:data:`ENCODERS`) made inside the block.

    Calls that bypass the module (a method called directly) bypass module hooks too, so the method that
    runs the blocks is wrapped on the instance for the block, and a forward pre-hook marks the calls that
    entered through the module: each call is recorded once, as ``forward`` or by the method's name."""
    calls: list[BackboneCall] = []
    restore: list[Callable[[], None]] = []

    def wrap(path: str, encoder: nn.Module) -> None:
        inner = ENCODERS[type(encoder)]
        state = {"entered": False}
        original = getattr(encoder, inner)
        names = list(inspect.signature(original).parameters)[1:]  # after the input

        def pre_hook(module, args, kwargs):
            state["entered"] = True

        def post_hook(module, args, kwargs, output):
            state["entered"] = False

        def recorded(x, *args, **kwargs):
            named = dict(zip(names, args), **kwargs)
            calls.append(BackboneCall(
                path, "forward" if state["entered"] else inner, x.detach().clone(),
                {k: v.detach().clone() for k, v in named.items() if v is not None}, torch.is_grad_enabled()))
            state["entered"] = False
            return original(x, *args, **kwargs)

        handles = [encoder.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   encoder.register_forward_hook(post_hook, with_kwargs=True)]
        setattr(encoder, inner, recorded)

        def undo() -> None:
            for handle in handles:
                handle.remove()
            delattr(encoder, inner)  # the class's method again

        restore.append(undo)

    for path, encoder in encoders(method).items():
        wrap(path, encoder)
    try:
        yield calls
    finally:
        for undo in restore:
            undo()


def replay_step(method: Method, calls: list[BackboneCall], precision: str, device: torch.device) -> Callable[[], None]:
    """A function running the recorded calls once: forward of every call, then one backward from the sum
    of the outputs of the calls made with gradients; gradients are dropped afterwards."""
    networks = {call.network: method.get_submodule(call.network) for call in calls}
    params = [p for network in networks.values() for p in network.parameters() if p.requires_grad]

    def step() -> None:
        total = None
        with autocast_context(precision, device):
            for call in calls:
                network = networks[call.network]
                with torch.set_grad_enabled(call.grad):
                    if call.entry == "forward":
                        out = network(call.inputs, **call.kwargs)
                        out = out["tokens"] if isinstance(out, dict) else out
                    else:
                        out = getattr(network, call.entry)(call.inputs, **call.kwargs)
                if out.requires_grad:
                    part = out.float().sum()
                    total = part if total is None else total + part
        if total is not None:
            total.backward()
        for p in params:
            p.grad = None

    return step


# ----------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak memory of a phase, in MiB: CUDA max allocated, or on the CPU the peak resident set above the
    level at the start of the phase (0 when the phase allocated nothing new)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_rise"
        self._before = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _trim_heap()
        _reset_peak_rss()
        self._before = _status_kib("VmRSS")

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MIB
        peak = _status_kib("VmHWM")
        if peak is None or self._before is None:  # no /proc: the process's lifetime peak, a coarser figure
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return max(peak - self._before, 0) / 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


def _trim_heap() -> None:
    """Give freed heap back to the system (glibc), so a phase's peak is not hidden by a previous one's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- timing

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the loader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _alternating(fns: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, called in turn ``rounds`` times (one call of each per
    round), so that a load that comes and goes on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def view_specs(method: Method, stream: str) -> list[CropSpec]:
    """The crops the method cuts from a batch of ``stream`` (its ``specs``; a bootstrap stream's
    ``bootstrap_specs``; SimSiam's one ``spec``, cut twice); empty when the method keeps none."""
    if stream == "bootstrap":
        return list(getattr(method, "bootstrap_specs", []))
    if isinstance(getattr(method, "specs", None), (list, tuple)):
        return list(method.specs)
    spec = getattr(method, "spec", None)
    return [spec, spec] if isinstance(spec, CropSpec) else []


def measure_pipeline(run: Run, steps: int) -> tuple[dict, dict[str, dict]]:
    """(a): ``steps`` batches of every stream through the run's loaders, moved to the device, with the
    method's views built there. Returns the figures and the first step's batches (on the device)."""
    loaders = make_loaders(run, 0, steps)
    generator = torch.Generator(device=run.device).manual_seed(0)
    specs = {name: view_specs(run.method, name) for name in run.streams}
    first, started, images = None, 0.0, 0
    cpu_before = _cpu_seconds()
    for stream_batches in zip(*loaders.values()):
        batches = device_batches(run, stream_batches)
        for name, batch in batches.items():
            if specs[name]:
                make_views(batch["image"], specs[name], generator, aspect=batch["aspect"])
        _synchronize(run.device)
        if first is None:  # the first batch pays for starting the workers: the rate counts the others
            first, started = batches, time.perf_counter()
            continue
        images += sum(len(batch["image"]) for batch in batches.values())
    wall = time.perf_counter() - started
    del loaders  # joins the workers, so that their CPU time is counted
    cpu = _cpu_seconds() - cpu_before
    if first is None or images == 0:
        raise ConfigError(f"wildssl bench needs at least 2 batches of data to time the pipeline; it read {steps} "
                          "(raise --pipeline-steps) or the data is smaller than one batch")
    all_images = images + sum(len(batch["image"]) for batch in first.values())
    return {"pipeline_images_per_s": images / max(wall, 1e-9),
            "pipeline_images_per_cpu_s": all_images / max(cpu, 1e-9),
            "pipeline_workers": resolve_num_workers(run.config["data"]["num_workers"]),
            "pipeline_views": any(bool(s) for s in specs.values())}, first


def measure_decode(run: Run, count: int) -> dict:
    """Read + decode + resize of ``count`` images of the first stream in this process, per CPU-second and
    per second (wall). With a device decoder (``data.decode: gpu``) the files are read here (the workers'
    part) and decoded and resized on the device in batches of ``train.batch_size``, synchronized."""
    name = run.streams[0]
    source, decoder = run.sources[name], run.decoders.get(name)
    backend = "gpu" if decoder is not None else "cpu"
    if not hasattr(source, "__getitem__") or not hasattr(source, "__len__"):
        # a streamed source has no random access
        return {"decode_backend": backend, "decode_images_per_cpu_s": None, "decode_images_per_s": None}
    count = min(count, len(source))
    _synchronize(run.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    if decoder is None:
        for index in range(count):
            source[index]
    else:
        items, batch = JpegBytes(source), run.config["train"]["batch_size"]
        for first in range(0, count, batch):
            decoder(collate([items[index] for index in range(first, min(first + batch, count))]))
        _synchronize(run.device)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"decode_backend": backend, "decode_images_per_cpu_s": count / max(cpu, 1e-9),
            "decode_images_per_s": count / max(wall, 1e-9)}


# ----------------------------------------------------------------------------- the bench

def bench(config: dict, recipe: str, steps: int = 10, warmup: int = 2, pipeline_steps: int | None = None,
          decode_images: int = 64) -> dict:
    """Measure (a)-(d) of ``config`` (see the module docstring); returns the JSON-ready figures."""
    if steps < 1 or warmup < 1:
        raise ConfigError(f"wildssl bench: --steps and --warmup must be >= 1 (got {steps}, {warmup}); the warm-up "
                          "steps also measure the peak memory")
    if pipeline_steps is not None and pipeline_steps < 2:
        raise ConfigError(f"--pipeline-steps {pipeline_steps}: the pipeline is timed over at least 2 batches (the "
                          "first is not timed)")
    pipeline_steps = pipeline_steps or max(steps + warmup, 3)
    if max(steps + 2 * warmup + 1, pipeline_steps) > MAX_STEPS:
        raise ConfigError(f"wildssl bench: --steps {steps}, --warmup {warmup} and --pipeline-steps {pipeline_steps} "
                          f"need more than the {MAX_STEPS} steps a run supports; a bench needs tens")
    compile_ = config["train"]["compile"]
    config = {**config, "train": {**config["train"], "steps": max(steps + 2 * warmup + 1, pipeline_steps),
                                  "compile": False, "images": None, "epochs": None}}
    with tempfile.TemporaryDirectory(prefix="wildssl-bench-") as out_dir:
        run = build_run(config, out_dir)
        run.release_lock()  # the folder goes now: a bench writes no run
    device, precision = run.device, config["train"]["precision"]
    run.method.train()
    pipeline, batches = measure_pipeline(run, pipeline_steps)
    decode = measure_decode(run, decode_images)

    # one real step, recorded; then the networks are compiled (when asked)
    with record_backbone_calls(run.method) as calls:
        training_step(run, batches, 0)
    if compile_:
        compile_networks(run.method)
    step_index = iter(range(1, run.total_steps))

    def step() -> None:
        training_step(run, batches, next(step_index))

    bare = replay_step(run.method, calls, precision, device)
    # the warm-up calls (and compilation) measure the peak memory of each; then (c) and (b) are timed in turn
    memory, peaks = PeakMemory(device), {}
    for name, fn in (("step", step), ("bare", bare)):
        memory.start()
        for _ in range(warmup):
            fn()
        peaks[name] = memory.stop()
    seconds = _alternating({"step": step, "bare": bare}, steps, device)

    images = run.images_per_step
    step_rate, bare_rate = images / seconds["step"], images / seconds["bare"]
    return {
        "recipe": recipe, "method": run.method.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data": {name: config["data"][name] for name in run.streams}, "batch_sizes": run.batch_sizes,
        "images_per_step": images, "precision": precision, "compile": bool(compile_),
        "steps": steps, "warmup": warmup,
        **pipeline, **decode,
        "bare_images_per_s": bare_rate, "step_images_per_s": step_rate,
        "step_over_bare": step_rate / bare_rate, "pipeline_over_step": pipeline["pipeline_images_per_s"] / step_rate,
        "memory_kind": memory.kind, "step_peak_mib": peaks["step"], "bare_peak_mib": peaks["bare"],
        "backbone_calls": [call.describe() for call in calls],
    }


def summary_lines(result: dict) -> list[str]:
    """The human-readable report of :func:`bench`."""
    calls = result["backbone_calls"]
    described = "; ".join(f"{c['network']}{'' if c['grad'] else ' (no grad)'} {c['input']}"
                          + "".join(f" {k}={v}" for k, v in c["kwargs"].items()) for c in calls)
    decode = result["decode_images_per_cpu_s"]
    return [
        f"wildssl bench {result['recipe']} on {result['device']} ({result['threads']} threads), "
        f"{result['images_per_step']} images per step, precision {result['precision']}, "
        f"compile {result['compile']}",
        f"(a) pipeline: {result['pipeline_images_per_s']:.1f} images/s with {result['pipeline_workers']} workers, "
        f"{result['pipeline_images_per_cpu_s']:.1f} images per CPU-second (read+decode+views)"
        + (f"; decode alone ({result['decode_backend']}) {decode:.1f} images per CPU-second, "
           f"{result['decode_images_per_s']:.1f} images/s in one process" if decode else ""),
        f"(b) bare networks: {result['bare_images_per_s']:.1f} images/s ({len(calls)} encoder calls: {described})",
        f"(c) full step: {result['step_images_per_s']:.1f} images/s",
        f"(d) peak memory ({result['memory_kind']}): step {result['step_peak_mib']:.1f} MiB, "
        f"bare {result['bare_peak_mib']:.1f} MiB",
        f"(c)/(b) = {result['step_over_bare']:.3f}   (a)/(c) = {result['pipeline_over_step']:.3f}",
    ]
