"""Metrics to JSONL and TensorBoard, and collapse alarms.

``metrics.jsonl`` in the run directory gets one JSON object per logged step (``step``, ``time`` and
every metric), in strict JSON: a NaN or infinite figure (the loss of a skipped step) is written as
``null``, which jq, JavaScript and pandas read, where Python's bare ``NaN`` is not JSON
(:func:`wildssl.io.read_metrics` reads ``null`` back as NaN); TensorBoard event files go to
``<run>/tensorboard`` when the ``tensorboard`` package is
installed (optional dependency: ``pip install wildssl[tensorboard]``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from wildssl.io import atomic_write_text, metrics_step

log = logging.getLogger("wildssl")


class MetricLogger:
    """Append metrics to ``<run>/metrics.jsonl`` and, optionally, TensorBoard.

    ``truncate_after``: a resumed run replays the steps after its checkpoint, so the rows logged for
    steps past it by the interrupted run are removed first; each step is logged once.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, truncate_after: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and metrics_step(line) <= truncate_after]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _finite_or_null(value):
    """``value`` with every NaN or infinite float in it (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {name: _finite_or_null(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


# Findings that are never a phase of training, so watched from the first logged step (not after_step).
WATCHED_FROM_START = ("no_gradient", "no_pairs")


# Metrics that measure the spread of l2-normalized embeddings (x sqrt(D)); near 0 means collapse.
EMBEDDING_STD_KEYS = ("embedding_std", "cache_embedding_std")


class CollapseMonitor:
    """Warn about the three collapses users of DINO-style training hit most.

    The method reports, where it can:
    - ``uniform_loss``: ln(K) for a distillation loss over K prototypes. A loss that sits within
      ``rel_tol`` of it means the student predicts (and the teacher gives) a uniform distribution.
    - ``teacher_entropy``: mean entropy of the teacher's distribution, in nats. Near 0 means every
      image gets the same one-hot target.
    - ``embedding_std``: per-dimension std across the batch of l2-normalized embeddings, times sqrt(D)
      (about 1 for well-spread embeddings, 0 when all embeddings coincide); ``cache_embedding_std`` is
      the same over a method's whole latent cache (AdaSim, once per epoch).
    - ``grad_norm`` exactly 0: nothing learns (every loss weight 0, a distribution over one class); and
      ``iou_range_found`` exactly 0: AB's IoU ablation found no target, so its loss is off. Both watched from
      the first logged step.
    An alarm fires only after ``patience`` consecutive logged steps past ``after_step``.
    """

    def __init__(self, after_step: int = 0, patience: int = 3, rel_tol: float = 0.01,
                 entropy_floor: float = 0.05, std_floor: float = 0.05):
        self.after_step = after_step
        self.patience = patience
        self.rel_tol = rel_tol
        self.entropy_floor = entropy_floor
        self.std_floor = std_floor
        self.counts = {"uniform": 0, "one_hot": 0, "embedding": 0, "no_gradient": 0, "no_pairs": 0}

    def check(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Update counters with this step's metrics; return the alarms that fire now."""
        findings = {name: False for name in self.counts}
        if "uniform_loss" in metrics and "loss" in metrics and metrics["uniform_loss"] > 0:
            findings["uniform"] = abs(metrics["loss"] - metrics["uniform_loss"]) <= (
                self.rel_tol * metrics["uniform_loss"])
        if "teacher_entropy" in metrics:
            findings["one_hot"] = metrics["teacher_entropy"] < self.entropy_floor
        spreads = [metrics[k] for k in EMBEDDING_STD_KEYS if k in metrics]
        if spreads:
            findings["embedding"] = min(spreads) < self.std_floor
        findings["no_gradient"] = metrics.get("grad_norm") == 0.0
        findings["no_pairs"] = metrics.get("iou_range_found") == 0.0  # AB's IoU ablation found no target at all
        alarms = []
        for name, found in findings.items():
            started = step >= self.after_step or name in WATCHED_FROM_START
            self.counts[name] = self.counts[name] + 1 if (found and started) else 0
            if self.counts[name] >= self.patience:
                alarms.append(self._message(name, metrics))
        return alarms

    @staticmethod
    def _message(name: str, metrics: dict[str, float]) -> str:
        if name == "uniform":
            return (f"collapse alarm: loss {metrics['loss']:.4f} sits at ln(K) = {metrics['uniform_loss']:.4f} "
                    "(uniform collapse: check teacher temperature, centering momentum, lr)")
        if name == "no_gradient":
            return (f"training alarm: the gradient is exactly 0 (loss {metrics.get('loss', math.nan):.4f}), so nothing "
                    "learns (check that some loss weight is above 0 and that the method has more than one class to "
                    "predict)")
        if name == "no_pairs":
            return ("bootstrap alarm: no pair of crops found a target in method.ab_iou_range, so the bootstrap loss "
                    "is 0 and annotation bootstrapping is off (widen the range, or the crops' ab_crop_scale)")
        if name == "one_hot":
            return (f"collapse alarm: teacher entropy {metrics['teacher_entropy']:.4f} nats is near 0 "
                    "(one-hot collapse: check centering)")
        key = min((k for k in EMBEDDING_STD_KEYS if k in metrics), key=lambda k: metrics[k])
        return (f"collapse alarm: {key.replace('_', ' ')} {metrics[key]:.4f} (x sqrt(D)) is near 0 "
                "(all embeddings coincide)")


# Seconds between two progress lines when the console is not a terminal (a batch job's log file).
PLAIN_PROGRESS_SECONDS = 30.0


class ProgressBar:
    """The run's tqdm bar: loss, images/s, ETA, and the first alarm. While it is open, log lines printed to the
    console go through tqdm, so that a k-NN or alarm line starts a line of its own instead of trailing the bar.

    When stderr is not a terminal (``> log.txt 2>&1``, ``| tee``, a batch job), a bar would write one carriage-return
    update per step into the file (33 KB of one "line" for 300 steps); there it prints a plain line instead (step,
    loss, images/s, ETA), at most every :data:`PLAIN_PROGRESS_SECONDS` and at the last step."""

    def __init__(self, run, terminal: bool | None = None) -> None:
        self.total = run.total_steps
        self.name = run.config["method"]["name"]
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._last_line = -math.inf  # the first logged step prints at once: its ETA is the first a user wants
        self.bar = None
        self._console = ExitStack()  # the console handlers come back on close
        if self.terminal:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=run.total_steps, initial=run.start_step, desc=self.name, unit="step",
                            dynamic_ncols=True)
            self._console.enter_context(logging_redirect_tqdm())

    def show(self, done: int, metrics: dict, seconds_per_step: float, alarms: list[str]) -> None:
        postfix = {"loss": f"{metrics['loss']:.4f}", "img/s": f"{metrics['images_per_s']:.0f}",
                   "eta": format_duration((self.total - done) * seconds_per_step)}
        if alarms:
            postfix["ALARM"] = alarms[0].split(":")[1].split("(")[0].strip()
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_line >= PLAIN_PROGRESS_SECONDS or done == self.total:
            self._last_line = now
            log.info("%s: step %d/%d (%d%%), %s", self.name, done, self.total, 100 * done // max(self.total, 1),
                     ", ".join(f"{k} {v}" for k, v in postfix.items()))

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._console.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
