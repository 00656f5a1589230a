"""``wildssl plot RUN``: curves of a run's logged metrics, including annotation bootstrapping's top-1
agreement per source/target IoU bucket and AdaSim's per-epoch neighbour diagnostics (the pictures of
sampled partners are :mod:`wildssl.eval.neighbour_plot`). Needs matplotlib (``pip install wildssl[plot]``)."""

from __future__ import annotations

import re
from pathlib import Path

from wildssl.errors import ConfigError, DataError
from wildssl.io import read_metrics

ACCURACY_PANEL = "k-NN and online probe top-1"  # the title of the accuracy panel

# AdaSim / +NN / oracle diagnostics, logged once per epoch.
NEIGHBOUR_KEYS = ("neighbour_ratio", "nn_self_ratio", "nn_top1_accuracy", "nn2_top1_accuracy")
AGREEMENT = re.compile(r"^agreement_iou_(?P<low>[0-9.]+)-(?P<high>[0-9.]+)$")


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` over the records that have it."""
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("wildssl plot needs matplotlib: pip install matplotlib (or wildssl[plot])") from None
    return plt


def metrics_figure(records: list[dict], title: str = ""):
    """A matplotlib figure of a run's records: loss, k-NN, bootstrap agreement (one line per IoU bucket),
    neighbour ratio and NN accuracies, spread of embeddings; panels without data are left out."""
    plt = _pyplot()
    keys = sorted({k for r in records for k in r})
    buckets = sorted((k for k in keys if AGREEMENT.match(k)), key=lambda k: float(AGREEMENT.match(k)["low"]))
    losses = [k for k in ("loss", "base_loss", "bootstrap_loss") if k in keys]
    # top-1 only: top-5 (in metrics.jsonl) would share the axis at 3x the value and flatten the curve a user watches
    accuracy = [k for k in ("knn_top1", "online_probe_top1") if k in keys]
    neighbours = [k for k in NEIGHBOUR_KEYS if k in keys]
    spread = [k for k in ("embedding_std", "cache_embedding_std") if k in keys]
    slots = [k for k in ("active_slots", "active_slots_mean") if k in keys]  # SlotMIM's prototypes in use
    panels = [("loss", losses), (ACCURACY_PANEL, accuracy),
              ("bootstrap top-1 agreement by IoU", (["agreement"] if "agreement" in keys else []) + buckets),
              ("neighbour pairs (per epoch)", neighbours), ("spread of embeddings (collapse: near 0)", spread),
              ("slots in use (collapse: few)", slots)]
    panels = [(name, names) for name, names in panels if names]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (name, names) in zip(axes[0], panels):
        for key in names:
            steps, values = series(records, key)
            floor = next((r[f"{key}_random_init"] for r in records if f"{key}_random_init" in r), None)
            if floor is not None:  # the k-NN starts from the same network at its random initialization (step 0)
                steps, values = [0] + steps, [floor] + values
            label = key.replace("agreement_iou_", "IoU ")
            line, = axis.plot(steps, values, label=label, linewidth=2 if key == "agreement" else 1.2,
                              marker="o" if len(steps) == 1 else None)  # one logged row: a line of one point is not drawn
            if floor is not None:
                axis.axhline(floor, color=line.get_color(), linestyle="--", linewidth=1, label="random init")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<run>/metrics.png`` (or ``out``): see :func:`metrics_figure`."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise DataError(f"no metrics to plot in {run_dir} (expected {run_dir / 'metrics.jsonl'})")
    figure = metrics_figure(records, str(run_dir))
    out = Path(out) if out else run_dir / "metrics.png"
    figure.savefig(out, dpi=100)
    _pyplot().close(figure)
    return out
