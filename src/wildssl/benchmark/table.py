"""A suite's outputs from its recorded runs only: ``results.json``, ``table.md``, ``probes.png``, ``knn_curve.png``.

``wildssl benchmark report DIR`` calls :func:`write_outputs`; ``benchmark run`` calls it at the end. Each
cell of the table is the mean over the recorded seeds of one figure and its **spread**, the sample
standard deviation over seeds (``numpy.std(values, ddof=1)``; none with one seed), in percent for
fractions. The floor row is the random-init encoder (:func:`wildssl.benchmark.runner.run_floor`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from wildssl.benchmark.suite import FLOOR
from wildssl.errors import DataError

log = logging.getLogger("wildssl")
# probe kind -> the figures shown for it, first found wins (discovery shows both)
FIGURES = {
    "knn": (("top1",),), "linear": (("top1",),), "attentive": (("top1",),),
    "decoder": (("box_top1", "image_top1"),), "fewshot": (("accuracy",),), "segment": (("miou",),),
    "discovery": (("corloc",), ("jaccard",)), "zeroshot": (("zeroshot_top1",),),
}


RERUN = ("delete it to evaluate that run again (its training is kept when train_done.json is there), "
         "or delete its folder to run it again")


def read_record(path: Path, remedy: str = RERUN) -> dict:
    """The JSON record at ``path``; a DataError naming the file and ``remedy`` when it is not JSON (a truncated
    or hand-edited file: the runner writes its records atomically)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = (f"{error.msg}: line {error.lineno} column {error.colno}"
                  if isinstance(error, json.JSONDecodeError) else "not text")
        raise DataError(f"{path} is not valid JSON ({reason}); {remedy}") from None


META_KEYS = ("suite", "scale", "seeds", "command", "device", "started")  # what suite.json must hold
SUITE_KEYS = ("name", "entries", "probes")
RESULT_KEYS = ("label", "seed", "probes", "metrics", "train_seconds", "eval_seconds")  # and each result.json


def _require(record: dict, keys: tuple[str, ...], path: Path, remedy: str, what: str = "") -> dict:
    """``record``, or a DataError naming ``path`` and the first of ``keys`` it lacks (a hand-edited or foreign
    file; the runner writes every key)."""
    missing = [key for key in keys if not isinstance(record, dict) or key not in record]
    if missing:
        raise DataError(f"{path} has no {what}{missing[0]!r} (not written by wildssl benchmark run, or edited); "
                        f"{remedy}")
    return record


def read_meta(path: Path, remedy: str = "run the suite again with wildssl benchmark run (the recorded runs are "
                                         "kept)") -> dict:
    """A suite folder's ``suite.json``, checked to hold what the runner writes (else a DataError naming it)."""
    meta = _require(read_record(path, remedy), META_KEYS, path, remedy)
    _require(meta["suite"], SUITE_KEYS, path, remedy, "suite key ")
    return meta


def read_runs(out: Path) -> tuple[dict, list[dict]]:
    """``suite.json`` and the ``runs/*/result.json`` of its seeds in a suite folder (sorted by label and seed);
    the recorded runs of other seeds are left out and counted in ``meta["left_out"]`` (``{"runs", "seeds"}``)."""
    meta_path = out / "suite.json"
    if not meta_path.is_file():
        raise DataError(f"{out} is not a benchmark folder: no suite.json (written by wildssl benchmark run)")
    meta = read_meta(meta_path)
    runs = [_require(read_record(path), RESULT_KEYS, path, RERUN)
            for path in sorted((out / "runs").glob("*/result.json"))]
    # the seeds of the latest invocation (--seeds 2 after --seeds 3 leaves the third seed's runs out: named)
    others = [r for r in runs if r["seed"] not in meta["seeds"]]
    meta["left_out"] = {"runs": len(others), "seeds": sorted({r["seed"] for r in others})}
    runs = [r for r in runs if r["seed"] in meta["seeds"]]
    return meta, sorted(runs, key=lambda r: (r["label"], r["seed"]))


def left_out_note(meta: dict) -> str:
    """``N recorded runs of seeds ... left out ...`` when ``meta["left_out"]`` counts any, else ``""``."""
    left = meta.get("left_out") or {"runs": 0}
    if not left["runs"]:
        return ""
    seeds = ", ".join(map(str, left["seeds"]))
    return (f"{left['runs']} recorded runs of seeds {seeds} left out (this run's seeds: "
            f"{', '.join(map(str, meta['seeds']))}); wildssl benchmark run with --seeds {max(left['seeds']) + 1} "
            f"includes them (nothing recorded is run again)")


def unfinished_note(meta: dict, runs: list[dict]) -> str:
    """``"; N of the M runs of this command recorded so far ..."`` while some are missing, else ``""``: a table
    read during a run (or after one was stopped) says that it is incomplete."""
    seeds = meta["seeds"]
    expected = len(seeds) + sum(len(seeds[:e["seeds"]] if e.get("seeds") else seeds)  # the floor, then each entry
                                for e in meta["suite"]["entries"])
    if len(runs) >= expected:
        return ""
    return (f"; **{len(runs)} of the {expected} runs of this command recorded so far** (the same command again "
            "runs the rest)")


def columns(meta: dict, runs: list[dict]) -> list[tuple[str, str, str]]:
    """``[(column title, probe, figure)]``: each probe's figures (those recorded), then the suite's metrics."""
    from wildssl.eval.report import probe_kind

    found = []
    for probe in meta["suite"]["probes"]:
        for choices in FIGURES.get(probe_kind(probe), ()):
            figure = next((f for f in choices if any(f in r["probes"].get(probe, {}) for r in runs)), None)
            if figure is not None:
                found.append((f"{probe} {figure}", probe, figure))
    found += [(f"{metric} (last)", "metrics", metric) for metric in meta["suite"]["metrics"]]
    return found


def value_of(run: dict, probe: str, figure: str) -> float | None:
    holder = run["metrics"] if probe == "metrics" else run["probes"].get(probe, {})
    value = holder.get(figure)
    return None if value is None or not math.isfinite(value) else float(value)


def spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation or None for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def aggregate(meta: dict, runs: list[dict]) -> dict:
    """``{row label: {column title: {"mean", "spread", "n", "values"}}}``; the floor row first, then the
    entries in suite order; columns of :func:`columns`."""
    cols = columns(meta, runs)
    table: dict[str, dict] = {}
    for label in [FLOOR] + [e["label"] for e in meta["suite"]["entries"]]:
        mine = [r for r in runs if r["label"] == label]
        row = {}
        for title, probe, figure in cols:
            values = [v for v in (value_of(r, probe, figure) for r in mine) if v is not None]
            if values:
                mean, sd = spread(values)
                row[title] = {"mean": mean, "spread": sd, "n": len(values), "values": values}
        seconds = [r["train_seconds"] + r["eval_seconds"] for r in mine]
        row["_runs"] = {"n": len(mine), "seconds": round(sum(seconds), 1)}
        table[label] = row
    return table


def cell(stats: dict | None, percent: bool) -> str:
    """``mean ± spread`` (percent for fractions), ``-`` when nothing was recorded."""
    if stats is None:
        return "-"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{scale * stats['mean']:.{digits}f}"
    if stats["spread"] is not None:
        text += f" ± {scale * stats['spread']:.{digits}f}"
    return text


def markdown(meta: dict, runs: list[dict], table: dict) -> str:
    suite = meta["suite"]
    cols = columns(meta, runs)
    wall = sum(row["_runs"]["seconds"] for row in table.values())
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"# Benchmark suite `{suite['name']}` at scale {meta['scale']}", "",
             f"- Mirrors: {suite['mirrors'] or '-'}", f"- The seed's direction: {suite['direction'] or '-'}",
             f"- Command: `{meta['command']}`", f"- Date: {meta['started']}; device: {meta['device']}",
             f"- Wall time of the recorded runs (training + evaluation): {wall / 60:.1f} min",
             f"- Seeds recorded: {', '.join(map(str, seeds)) or 'none'}; network evaluated: {suite['network']}"
             + (f"; {left_out_note(meta)}" if left_out_note(meta) else "") + unfinished_note(meta, runs),
             "", ("Cells: mean ± spread over seeds (spread = sample standard deviation, n - 1; none with one seed); "
                  "probe figures in percent. `random_init` is the floor: the first entry's encoder at its initial "
                  "weights."),
             "", "| " + " | ".join(["entry", "runs"] + [c[0] for c in cols]) + " |", "|---|---|" + "---|" * len(cols)]
    for label, row in table.items():
        cells = [cell(row.get(title), probe != "metrics") for title, probe, _ in cols]
        lines.append(f"| {label} | {row['_runs']['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Entries (recipe, then the overrides of every run; data SPECs in suite.json):", ""]
    for entry in suite["entries"]:
        extra = f", encoder from {entry['init_from']}" if entry["init_from"] else ""
        lines.append(f"- {entry['label']}: `{entry['recipe']}` {' '.join(entry['set'])}{extra}")
    alarms = sorted({f"{r['label']} seed {r['seed']}: {a}" for r in runs for a in r.get("alarms", [])})
    if alarms:
        lines += ["", "Alarms raised during training:", ""] + [f"- {a}" for a in alarms]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, meta: dict, runs: list[dict], table: dict) -> list[str]:
    """``probes.png`` (every probe figure per entry, mean and spread) and ``knn_curve.png`` (online k-NN
    top-1 over training steps, mean over seeds); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    cols = [c for c in columns(meta, runs) if c[1] != "metrics"]
    if cols:
        figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(table) * max(1, len(cols)) / 2), 4))
        width = 0.8 / len(cols)
        for index, (title, _, _) in enumerate(cols):
            means = [100 * row[title]["mean"] if title in row else 0.0 for row in table.values()]
            errors = [100 * (row[title]["spread"] or 0.0) if title in row else 0.0 for row in table.values()]
            axis.bar(np.arange(len(table)) + index * width, means, width, yerr=errors, label=title, capsize=2)
        axis.set_xticks(np.arange(len(table)) + 0.4 - width / 2, list(table), rotation=20, fontsize=8)
        axis.set(ylabel="%", title=f"{meta['suite']['name']} ({meta['scale']})")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, axis="y")
        figure.tight_layout()
        figure.savefig(out / "probes.png", dpi=90)
        plt.close(figure)
        written.append("probes.png")
    curves = {}
    for run in runs:
        for step, value in run.get("knn_curve", []):
            curves.setdefault(run["label"], {}).setdefault(step, []).append(value)
    if curves:
        figure, axis = plt.subplots(figsize=(6, 4))
        for label, points in curves.items():
            steps = sorted(points)
            axis.plot(steps, [100 * float(np.mean(points[s])) for s in steps], marker="o", label=label)
        axis.set(xlabel="training step", ylabel="online k-NN top-1 (%)",
                 title="k-NN over training (step 0: random init)")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / "knn_curve.png", dpi=90)
        plt.close(figure)
        written.append("knn_curve.png")
    return written


def write_outputs(out: str | Path, plots: bool = True) -> dict:
    """Rebuild ``results.json``, ``table.md`` and (with ``plots``) the plots of the suite folder ``out`` from
    its recorded runs."""
    out = Path(out)
    meta, runs = read_runs(out)
    if left_out_note(meta):
        log.warning("%s: %s", out / "table.md", left_out_note(meta))
    trained = [r for r in runs if r["label"] != FLOOR]
    unlogged = [m for m in meta["suite"].get("metrics", []) if trained and not any(m in r["metrics"] for r in trained)]
    if unlogged:  # a misspelt name, or one no entry's method logs: a column of "-" would say nothing
        log.warning("%s: no run logged the metrics %s (names as in the runs' metrics.jsonl)", out / "table.md",
                    ", ".join(unlogged))
    table = aggregate(meta, runs)
    text = markdown(meta, runs, table)
    pictures = write_plots(out, meta, runs, table) if plots else []
    if pictures:
        text += "\n" + "\n".join(f"![{p}]({p})" for p in pictures) + "\n"
    (out / "table.md").write_text(text)
    results = {"suite": meta["suite"]["name"], "scale": meta["scale"], "command": meta["command"],
               "device": meta["device"], "started": meta["started"], "table": table, "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
