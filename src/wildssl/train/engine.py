"""The training loop: one engine for every method.

:func:`train` is a flat loop over steps: build the run (:mod:`wildssl.train.run`), then per step take
the batches, run one guarded optimization step (:mod:`wildssl.train.step`), log, evaluate, checkpoint.

Batches of map-style sources are a pure function of ``(train.seed, step)``
(:class:`~wildssl.data.sampler.StepBatchSampler`); a streamed source (:mod:`wildssl.data.shard_stream`)
records its position after every step and the checkpoint keeps it. Views are drawn from a generator
seeded by ``(train.seed, step, rank)``. So resuming from a checkpoint reproduces an unbroken run bit for
bit on the CPU.

Logged values are means over the steps since the previous log line (finite steps only), accumulated on
the device and read once per ``train.log_every`` steps; the step itself reads one flag tensor
(:mod:`wildssl.train.step`).

Definitions used everywhere:
- ``train.batch_size`` is the **global** batch (all ranks together); each rank gets ``batch / world``.
- An **epoch** is one pass over the first stream's source: ``len(source) // train.batch_size`` steps.
- The run's length is ``train.images`` (images seen, all streams), else ``train.epochs``, else
  ``train.steps``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from wildssl import distributed as dist
from wildssl.data.photometric import loses_colour
from wildssl.data.shard_stream import ShardStream
from wildssl.errors import ConfigError
from wildssl.io import read_metrics
from wildssl.eval.online_probe import make_online_probe
from wildssl.train.logging import CollapseMonitor, MetricLogger, ProgressBar
from wildssl.train.run import (UNREADABLE_LIST, Run, TrainingStopped, build_run, checkpoint_location, loader_spans,
                               make_loaders, pick_device, save_checkpoint, warn_about_the_schedule)
from wildssl.train.checkpoint import run_eval_network
from wildssl.train.step import StepResult, device_batches, training_step

log = logging.getLogger("wildssl")

# A share of a source's images that, unreadable, raises a data alarm (_Reporter._check_unreadable).
UNREADABLE_SHARE = 0.1
# The eval.* keys the online k-NN's figures depend on: a resume that changes one measures the floor again.
FLOOR_SETTINGS = ("knn_train", "knn_test", "knn_k", "knn_temperature", "pool", "image_size", "encoder")

__all__ = ["train", "TrainingStopped", "pick_device"]


class _InterruptFlag:
    """SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption: SLURM, Kubernetes) and SIGHUP (a closed terminal) ask the
    loop to save a checkpoint at the next step boundary and exit; a second signal stops at once. ``signal_number``
    is the first one received (the exit status is 128 + it, as a shell reports a process it ended)."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self):
        self.raised = False
        self.signal_number = None
        self.previous: dict = {}
        self.pid = os.getpid()

    def __enter__(self):
        for number in self.SIGNALS:
            try:
                self.previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook executor): the signal keeps its default
                pass
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker, which inherited the handler: the trainer says it once
            return
        if self.raised:  # a second signal stops at once
            raise KeyboardInterrupt
        self.raised, self.signal_number = True, signum
        log.warning("%s received: saving a checkpoint at the end of this step (Ctrl-C again to abort)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for number, previous in self.previous.items():
            signal.signal(number, previous)
        return False


def _colour_hint(method: dict) -> str:
    """A pointer to ``keep_colour`` for a method whose views lose their colour (hue jitter, grey views): on
    photos that colour tells apart (snow, water, grass; signs) it is what those views teach the encoder to
    ignore (benchmarks/demo.md, twelfth round)."""
    pipeline = method.get("photometric")
    if not isinstance(pipeline, str) or not loses_colour(pipeline):
        return ""
    return (f"; method.photometric={pipeline} jitters hue and greys views out: if colour tells your classes apart, "
            "try --set method.photometric=keep_colour")


class _Reporter:
    """Logging of one run: metrics every ``train.log_every`` steps, alarms, progress, online k-NN."""

    def __init__(self, run: Run, knn_evaluator):
        tcfg = run.config["train"]
        self.run = run
        self.knn_evaluator = knn_evaluator
        try:
            # rows after the checkpoint's step are replayed; a run that starts at step 0 measures its floor again,
            # so a killed first attempt's rows (its step-0 floor among them) all go
            self.logger = MetricLogger(run.out_dir, tensorboard=tcfg["tensorboard"],
                                       truncate_after=run.start_step if run.start_step else -1) if run.main else None
        except OSError as error:  # a full disk while dropping the rows of replayed steps
            raise ConfigError(f"cannot write the run directory {run.out_dir}: {error.strerror or error}; "
                              "free some space or choose another --out") from None
        self.monitor = CollapseMonitor(after_step=max(1, run.total_steps // 10))
        # Epoch diagnostics have their own monitor: its patience counts epochs, not logged steps.
        self.epoch_monitor = CollapseMonitor(after_step=max(1, run.total_steps // 10))
        self.progress = ProgressBar(run) if run.main and tcfg["progress"] else None
        self._alarms: dict[str, str] = {}  # one entry per kind of alarm, its latest message
        self.last_metrics: dict = {}
        self.knn_random: dict = {}
        self.window_start, self.window_steps = time.perf_counter(), 0
        # sums over the finite steps of the logging window, kept on the device and read once per window;
        # counted per name, since a method may report some metrics on logged steps only
        self.window_sums: dict[str, torch.Tensor | float] = {}
        self.window_counts: dict[str, int] = {}
        # (loss, gradient norm) of the window's last skipped step: logged when no step of the window was
        # finite, so a row shows which of the two was not finite
        self.window_skipped: tuple[float, float] | None = None

    def _log(self, done: int, metrics: dict) -> None:
        if self.logger is None:
            return
        try:
            self.logger.log(done, metrics)
        except OSError as error:  # a full disk: one line, and the checkpoint on the disk is still good
            raise TrainingStopped(f"training stopped at step {done}: cannot append to {self.logger.path}: "
                                  f"{error.strerror or error}; the last good checkpoint is "
                                  f"{self.run.last_good_checkpoint or 'none yet'}") from None

    @property
    def alarms(self) -> list[str]:
        """The alarms standing now, in the order they first fired."""
        return list(self._alarms.values())

    def alarm(self, step: int, message: str, kind: str | None = None) -> None:
        """Warn in the log, and keep ``message`` as the standing alarm of ``kind`` (default: the message
        itself, so a repeated collapse alarm is kept once)."""
        kind = kind or message
        if self._alarms.get(kind) != message:
            self._alarms[kind] = message
            log.warning("step %d: %s", step, message)

    def _accumulate(self, result: StepResult) -> None:
        values = {"loss": result.loss, "grad_norm": result.grad_norm, **result.metrics}
        for name, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.window_sums[name] = self.window_sums[name] + value if name in self.window_sums else value
            self.window_counts[name] = self.window_counts.get(name, 0) + 1

    def _window_means(self) -> dict[str, float]:
        """Means over the window's finite steps (NaN when none was finite), read from the device at once."""
        if not self.window_counts:
            loss, grad_norm = self.window_skipped or (math.nan, math.nan)
            return {"loss": loss, "grad_norm": grad_norm}
        names = list(self.window_sums)
        tensors = [n for n in names if torch.is_tensor(self.window_sums[n])]
        read = dict(zip(tensors, torch.stack([self.window_sums[n].reshape(()) for n in tensors]).cpu().tolist())) \
            if tensors else {}
        return {n: float(read.get(n, self.window_sums[n])) / self.window_counts[n] for n in names}

    def step(self, done: int, step: int, result: StepResult) -> None:
        run, tcfg = self.run, self.run.config["train"]
        self.window_steps += 1
        if result.finite:
            self._accumulate(result)
        else:  # a rare step: reading its two numbers costs one more device read
            self.window_skipped = (float(result.loss), float(result.grad_norm))
            log.warning("non-finite %s at step %d (%d so far): step skipped, nothing changed",
                        "gradient norm" if math.isfinite(self.window_skipped[0]) else "loss", step,
                        run.counters["nonfinite_steps"])
        if done % tcfg["log_every"] == 0 or done == run.total_steps:
            elapsed = time.perf_counter() - self.window_start
            means = self._window_means()
            metrics = {"loss": means.pop("loss"), "lr": float(run.schedules["lr"][step]),
                       "weight_decay": float(run.schedules["weight_decay"][step]),
                       "momentum": float(run.schedules["momentum"][step]), "grad_norm": means.pop("grad_norm"),
                       "images_per_s": self.window_steps * run.images_per_step / max(elapsed, 1e-9),
                       "epoch": done / run.steps_per_epoch, "nonfinite_steps": run.counters["nonfinite_steps"]}
            metrics.update(means)
            for alarm in self.monitor.check(done, metrics):
                self.alarm(done, alarm)
            self._check_unreadable(done)
            self._log(done, metrics)
            if self.progress is not None:
                self.progress.show(done, metrics, elapsed / max(self.window_steps, 1), self.alarms)
            self.last_metrics = metrics
            self.window_start, self.window_steps = time.perf_counter(), 0
            self.window_sums, self.window_counts, self.window_skipped = {}, {}, None
        if self.progress is not None:
            self.progress.update()

    def _check_unreadable(self, done: int) -> None:
        """A data alarm, once per stream, when more than :data:`UNREADABLE_SHARE` of a map-style source's images
        were unreadable (as far as this rank read): each is replaced by the next readable image, so those few are
        drawn several times as often as the rest, and the run trains on far fewer images than its folder holds."""
        for name, indices in self.run.corrupt_files.items():
            source, kind = self.run.sources.get(name), f"unreadable data.{name}"
            if kind in self._alarms or not hasattr(source, "__len__") or isinstance(source, ShardStream):
                continue
            if len(source) and len(indices) > UNREADABLE_SHARE * len(source):
                self.alarm(done, f"data alarm: at least {len(indices)} of the {len(source)} images of data.{name} are "
                                 f"unreadable ({100 * len(indices) / len(source):.0f}%): each is replaced by the next "
                                 "readable one, so those are drawn more often than the rest; fix or remove the files "
                                 "the log names", kind=kind)

    def epoch_end(self, done: int, epoch: int, metrics: dict | None) -> None:
        """Log the method's diagnostics of epoch ``epoch`` (0-based) at step ``done`` and check them for
        collapse (e.g. AdaSim's neighbour ratio and the spread of its latent cache)."""
        if not metrics:
            return
        metrics = {"epoch": float(epoch + 1), **{k: float(v) for k, v in metrics.items()}}
        for alarm in self.epoch_monitor.check(done, metrics):
            self.alarm(done, alarm)
        if self.logger is not None:
            self.logger.log(done, metrics)
        self.last_metrics.update(metrics)

    def evaluate(self, done: int, random_init: bool = False) -> None:
        """Online k-NN on the main process; before step 0 it measures the random initialization, the
        floor every later figure is compared with."""
        every = self.run.config["eval"]["knn_every"]
        if self.knn_evaluator is None or not every:
            return
        if not random_init and done % every and done != self.run.total_steps:
            return
        if self.run.main:
            result = self.knn_evaluator(self._floor_method() if random_init else self.run.method)
            if random_init:
                result = {f"{k}_random_init": v for k, v in result.items() if k.startswith("knn_top")}
                self.knn_random = result
            else:
                self.last_metrics.update(result)
                self._compare_with_random_init(done, result)
            self._log(done, result)
            log.info("step %d: %s", done, ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in result.items()))
        dist.barrier()

    def resumed(self) -> None:
        """On resume: the floor recorded before step 0 (the quality alarm and the summary compare with it again), or
        a new one when the online k-NN's settings changed since it was measured (``eval.*`` may change on resume)
        or it was off then: the floor of the new settings, at the run's random initialization, logged at the step
        the run resumes from."""
        if self.run.main:  # the figures up to the checkpoint: a resume with nothing left to train still reports them
            records = read_metrics(self.run.out_dir)
            self.knn_random, self.last_metrics = recorded_random_init(records), recorded_last_metrics(records)
        if self.knn_evaluator is None or not self.run.config["eval"]["knn_every"]:
            return
        saved, now = (self.run.saved_config or {}).get("eval", {}), self.run.config["eval"]
        changed = [f"eval.{key}: {saved.get(key)!r} -> {now[key]!r}" for key in FLOOR_SETTINGS
                   if saved.get(key) != now[key]]
        # the main process reads the metrics file; every rank must take the same path (the evaluation has a barrier)
        lost = dist.broadcast_flag(self.run.main and bool(saved.get("knn_every")) and not changed
                                   and not self.knn_random)
        if saved.get("knn_every") and not changed and not lost:
            return
        if self.run.main:
            reason = (f"its settings changed since the floor was measured ({', '.join(changed)})" if changed else
                      f"the floor measured before step 0 is not in {self.run.out_dir / 'metrics.jsonl'} any more"
                      if lost else "it was off when the run started, so no floor was measured")
            log.log(logging.WARNING if lost else logging.INFO,
                    "online k-NN: %s, so the random-initialization floor is measured again now", reason)
        self.evaluate(self.run.start_step, random_init=True)

    def _floor_method(self):
        """The network the floor measures: the run's own before step 0, or, when ``model.init_from`` loaded a
        trained encoder into it or the run resumed (its weights trained), the same method built at its random
        initialization without that file (the loaded encoder's figure was reported as "random initialization",
        and a locked one, LiT's, raised a quality alarm on every run)."""
        config = self.run.config
        if not config["model"]["init_from"] and self.run.start_step == 0:
            return self.run.method
        from wildssl.methods import build_initial_method

        state = torch.random.get_rng_state()  # the run's data order and augmentations stay as without the floor
        try:
            return build_initial_method(config, load_init_from=False).to(self.run.device)
        finally:
            torch.random.set_rng_state(state)

    def _compare_with_random_init(self, done: int, result: dict) -> None:
        floor = self.knn_random.get("knn_top1_random_init")
        if floor is None or "knn_top1" not in result:
            return
        if floor >= 1.0:  # nothing above it to reach: say that the measure is full, not that training failed
            self.alarm(done, f"quality alarm: k-NN top-1 is {100 * floor:.1f}% already at random initialization, so "
                             "this k-NN set cannot show what training adds (give a harder labelled split with --val)",
                       kind="quality")
        elif result["knn_top1"] <= floor and self.run.method.locks_encoder:  # training cannot move the figure
            self.alarm(done, f"quality alarm: k-NN top-1 {100 * result['knn_top1']:.1f}% at step {done} is not above "
                             f"the same encoder at random initialization ({100 * floor:.1f}%): method "
                             f"{self.run.method.name} locks the encoder model.init_from loaded "
                             f"({self.run.config['model']['init_from']}), so that encoder is no better than random on "
                             "this data; pre-train it longer or on data closer to this", kind="quality")
        elif result["knn_top1"] <= floor:  # one standing alarm, with the latest figure
            self.alarm(done, f"quality alarm: k-NN top-1 {100 * result['knn_top1']:.1f}% at step {done} is not above "
                             f"the same encoder at random initialization ({100 * floor:.1f}%): the encoder got no "
                             "better (check the learning rate, the augmentations and the budget for this data"
                             f"{_colour_hint(self.run.config['method'])})", kind="quality")
        elif self._alarms.pop("quality", None) is not None:
            log.info("step %d: k-NN top-1 %.1f%% is above random initialization (%.1f%%) again; quality alarm "
                     "cleared", done, 100 * result["knn_top1"], 100 * floor)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.logger is not None:
            self.logger.close()


def recorded_last_metrics(records: list[dict]) -> dict:
    """The latest value of each figure in a run's ``metrics.jsonl`` records (its loss, k-NN, ...), or ``{}``."""
    latest: dict = {}
    for record in records:
        latest.update({k: v for k, v in record.items() if k not in ("step", "time") and not k.endswith("_random_init")})
    return latest


def recorded_random_init(records: list[dict]) -> dict:
    """The ``knn_*_random_init`` figures a run's ``metrics.jsonl`` records hold last (before step 0, or at a resume
    whose k-NN settings changed), or ``{}``."""
    found = {}
    for record in records:
        if "knn_top1_random_init" in record:
            found = {k: v for k, v in record.items() if k.startswith("knn_top") and k.endswith("_random_init")}
    return found


def train(config: dict, out_dir: str | Path, resume: bool = False, knn_evaluator=None) -> dict:
    """Train ``config`` into ``out_dir``; returns a summary dict (steps, final loss, k-NN, counters, alarms).

    ``knn_evaluator(method) -> dict`` is called before the first step (the random-initialization floor)
    and every ``eval.knn_every`` steps on the main process (see
    :func:`wildssl.eval.evaluate.make_online_knn`). With ``eval.online_probe`` a linear probe trains on
    detached features of every finite step's first-stream batch (:mod:`wildssl.eval.online_probe`)."""
    run = build_run(config, out_dir, resume)
    try:
        return _train_run(run, knn_evaluator)
    finally:
        run.release_lock()  # another process may train the run directory now (it was locked while this one trained)


def _train_run(run: Run, knn_evaluator) -> dict:
    """:func:`train` once the run is built: the loop, the evaluations and the summary."""
    config = run.config  # resolved by build_run: a hand-built dict's missing sections filled, its values checked
    warn_about_the_schedule(run)
    tcfg = config["train"]
    online_probe = make_online_probe(config, run.sources[run.streams[0]], run.method, run.device)
    reporter = _Reporter(run, knn_evaluator)
    if run.start_step == 0:
        reporter.evaluate(0, random_init=True)
    else:
        reporter.resumed()
    run.method.train()
    done = run.start_step
    try:
        with _InterruptFlag() as interrupt:
            for start, stop in loader_spans(run):
                loaders = make_loaders(run, start, stop)
                for step, stream_batches in enumerate(zip(*loaders.values()), start=start):
                    batches = device_batches(run, stream_batches)
                    run.record_corrupt(batches)
                    result = training_step(run, batches, step, lambda: interrupt.raised)
                    if online_probe is not None and result.finite:
                        result.metrics.update(online_probe.step(run.method, batches[run.streams[0]]))
                    run.record_positions(batches)
                    done = step + 1
                    reporter.step(done, step, result)
                    if run.counters["nonfinite_steps"] > tcfg["max_nonfinite"] or (
                            not result.finite and tcfg["nonfinite"] == "stop"):
                        raise TrainingStopped(
                            f"training stopped at step {step}: {run.counters['nonfinite_steps']} non-finite steps "
                            f"(train.nonfinite={tcfg['nonfinite']}, train.max_nonfinite={tcfg['max_nonfinite']}); "
                            f"the last good checkpoint is {run.last_good_checkpoint or 'none (no checkpoint was written)'}")
                    if done % run.steps_per_epoch == 0:
                        epoch = done // run.steps_per_epoch - 1
                        reporter.epoch_end(done, epoch, run.method.on_epoch_end(epoch))
                    if result.interrupted:
                        save_checkpoint(run, done)
                        saved = checkpoint_location(tcfg["sharding"], run.out_dir)
                        name = signal.Signals(interrupt.signal_number).name if interrupt.signal_number else "SIGINT"
                        stopped = KeyboardInterrupt(f"interrupted ({name}) at step {done}; checkpoint saved to {saved} "
                                                    "(continue with --resume)")
                        stopped.signal_number = interrupt.signal_number or signal.SIGINT
                        raise stopped
                    # a kept copy (train.keep_every) is a checkpoint too, whatever train.checkpoint_every says
                    if done == run.total_steps or any(every and done % every == 0
                                                      for every in (tcfg["checkpoint_every"], tcfg["keep_every"])):
                        save_checkpoint(run, done)
                    reporter.evaluate(done)  # after the checkpoint: a k-NN that fails loses no training
    finally:
        reporter.close()
    run.gather_corrupt()
    run.write_unreadable_list()
    if run.main and run.counters["corrupt_images"]:
        log.warning("%d unreadable files were skipped%s", run.counters["corrupt_images"],
                    f"; they are listed in {run.out_dir / UNREADABLE_LIST}"
                    if (run.out_dir / UNREADABLE_LIST).is_file() else "")
    summary = {"run_dir": str(run.out_dir), "start_step": run.start_step, "total_steps": run.total_steps,
               "steps": done, "images_per_step": run.images_per_step, **run.counters, "alarms": reporter.alarms,
               "final_metrics": {**reporter.knn_random, **reporter.last_metrics}}
    if knn_evaluator is not None and config["eval"]["knn_every"]:  # which network the k-NN read, and how pooled
        summary["final_metrics"].update(knn_network=run_eval_network(run.method, config), knn_pool=config["eval"]["pool"])
    if math.isfinite(reporter.last_metrics.get("loss", float("nan"))):
        summary["final_loss"] = reporter.last_metrics["loss"]
    return summary
