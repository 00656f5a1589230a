"""Evaluation suites: run several probes on one encoder and write JSON plus a Markdown report with plots.

``wildssl eval all CHECKPOINT --suite SUITE.yaml --out DIR`` runs :func:`run_suite`. A suite file:

.. code-block:: yaml

    image_size: 32        # eval resolution of every probe (default: the encoder's img_size)
    load_size: null       # decode size of the sources (default: the eval resolution)
    batch_size: 256       # images per encoder pass during feature extraction
    num_workers: 0        # data-loading workers of the extraction
    seed: 0               # held-out splits, probe initialization, episodes
    probes:               # any subset, run in this order; each entry's keys are the probe's OPTIONS
      knn:       {train: SPEC, test: SPEC}                     # wildssl.eval.evaluate.KNN_OPTIONS
      linear:    {train: SPEC, test: SPEC}                     # wildssl.eval.linear.OPTIONS
      attentive: {train: SPEC, test: SPEC}                     # wildssl.eval.attentive.OPTIONS
      decoder:   {train: SPEC, test: SPEC}                     # wildssl.eval.decoder.OPTIONS
      fewshot:   {data: SPEC}                                  # wildssl.eval.fewshot.OPTIONS
      discovery: {data: SPEC}                                  # wildssl.eval.discovery.OPTIONS
      segment:   {train: SPEC, test: SPEC, ignore_index: 11}   # wildssl.eval.segmentation.OPTIONS

Every probe entry also takes ``image_size`` and ``load_size`` (e.g. segmentation at a finer grid). To
run a probe twice (on two datasets), label the second entry ``probe@label`` (``decoder@coco``).
Unknown keys are errors that list the valid ones. Features are extracted once per dataset and
resolution and cached (:mod:`wildssl.eval.cache`), so probes that share data share the pass.

Outputs in ``DIR``: ``results.json`` (every figure, each probe's wall time), ``report.md`` (a headline
table and a section per probe) and the pictures it links: per trained probe its curves (held-out score
per setting, loss per epoch) and test confusion matrix, and the discovery attention maps. Plots need
matplotlib; without it the report says so and keeps the numbers.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from wildssl.errors import ConfigError
from wildssl.eval import attentive, decoder, discovery, fewshot, linear, segmentation
from wildssl.eval.cache import FeatureStore
from wildssl.eval.evaluate import KNN_OPTIONS, run_knn, same_data
from wildssl.eval.probe import ProbeContext, resolve_options
from wildssl.io import atomic_write_text
from wildssl.schema import CORE_RULES, check_value, load_yaml

log = logging.getLogger("wildssl")

# name -> (the probe's options with their defaults, the function that runs it)
PROBES: dict[str, tuple[dict, Callable[[ProbeContext, dict], dict]]] = {
    "knn": (KNN_OPTIONS, run_knn),
    "linear": (linear.OPTIONS, linear.run),
    "attentive": (attentive.OPTIONS, attentive.run),
    "decoder": (decoder.OPTIONS, decoder.run),
    "fewshot": (fewshot.OPTIONS, fewshot.run),
    "discovery": (discovery.OPTIONS, discovery.run),
    "segment": (segmentation.OPTIONS, segmentation.run),
}
SUITE_DEFAULTS: dict[str, Any] = {"image_size": None, "load_size": None, "batch_size": 256, "num_workers": 0,
                                  "seed": 0, "probes": {}}
# Each top-level key's rule: the config key whose values it takes (wildssl.schema.CORE_RULES).
SUITE_KEY_RULES = {"image_size": "eval.image_size", "load_size": "data.load_size", "batch_size": "eval.batch_size",
                   "num_workers": "data.num_workers", "seed": "train.seed"}
# The figures of each probe that go into the headline table (fractions shown as percentages).
HEADLINES = {
    "knn": ("top1", "top5"),
    "linear": ("top1", "top5"),
    "attentive": ("top1", "top5"),
    "decoder": ("image_top1", "image_precision_at_1", "box_top1", "box_majority_baseline"),
    "fewshot": ("accuracy", "ci95"),
    "discovery": ("corloc", "jaccard"),
    "segment": ("miou", "pixel_accuracy"),
}


def read_suite(suite: str | Path | dict) -> dict:
    """A suite (YAML file or dict) with its defaults filled in; unknown keys and probes are ConfigErrors."""
    if isinstance(suite, dict):
        tree, where = dict(suite), "suite"
    else:
        path = Path(suite)
        if not path.is_file():
            raise ConfigError(f"suite file not found: {path} (a YAML file with a 'probes' mapping)")
        try:
            tree = load_yaml(path.read_text()) or {}  # 1e-3 is a number here, as in recipes
        except yaml.YAMLError as error:
            raise ConfigError(f"suite {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        where = str(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping with a 'probes' key")
    unknown = sorted(set(tree) - set(SUITE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(SUITE_DEFAULTS)}")
    resolved = {**SUITE_DEFAULTS, **tree}
    for key, rule_key in SUITE_KEY_RULES.items():  # `seed: abc`, `batch_size: 0` ended in tracebacks mid-suite
        if resolved[key] is not None or SUITE_DEFAULTS[key] is not None:  # null: the encoder's own size
            rule = CORE_RULES[rule_key]
            try:
                if isinstance(resolved[key], str):  # num_workers: auto is a training setting
                    raise ConfigError(key)
                check_value(rule_key, resolved[key], rule)
            except ConfigError:
                wanted = "an integer in [0, 256]" if key == "num_workers" else rule.describe()
                raise ConfigError(f"{key}: {resolved[key]!r} in {where} is invalid: it must be {wanted}") from None
    probes = resolved["probes"] or {}
    if not isinstance(probes, dict) or not probes:
        raise ConfigError(f"{where} names no probes; give 'probes:' with some of {', '.join(PROBES)}")
    for name, options in probes.items():
        if probe_kind(name) not in PROBES:
            raise ConfigError(f"unknown probe {name!r} in {where}; valid probes: {', '.join(PROBES)} (a second run "
                              "of one as probe@label)")
        if not re.fullmatch(r"[\w.-]+(@[\w.-]+)?", name):  # it names the probe's picture files
            raise ConfigError(f"probe {name!r} in {where}: a probe's label may hold letters, digits, '_', '-' and "
                              "'.' (probe@label), as it names the probe's files")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"probe {name!r} in {where} must map option names to values, got {options!r}")
        # every probe's option names and types now, not when its turn comes after the probes before it ran
        resolve_options(probe_kind(name), PROBES[probe_kind(name)][0], options)
    resolved["probes"] = {name: dict(options or {}) for name, options in probes.items()}
    return resolved


def probe_kind(name: str) -> str:
    """The probe an entry runs: ``"decoder"`` for ``decoder`` and ``decoder@coco``."""
    return name.split("@", 1)[0]


def run_suite(store: FeatureStore, suite: str | Path | dict, out_dir: str | Path | None = None, *,
              name: str = "encoder", progress: bool = False) -> dict:
    """Run every probe of ``suite`` on the encoder of ``store``; returns (and with ``out_dir`` writes)
    ``{"name", "date", "suite", "probes": {probe: figures + "seconds"}, "seconds"}``."""
    suite = read_suite(suite)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    store.batch_size, store.num_workers = suite["batch_size"], suite["num_workers"]
    image_size = suite["image_size"] or getattr(store.encoder, "img_size", 224)
    context = ProbeContext(store=store, image_size=image_size, seed=suite["seed"], progress=progress, out_dir=out)
    start = time.perf_counter()
    earlier, earlier_options = _earlier_results(out, name)
    shown = {**suite, "probes": {**earlier_options, **suite["probes"]}}  # each recorded probe's options
    results: dict[str, Any] = {}
    try:
        _run_probes(suite, context, name, results)
    except BaseException:  # keep the probes that finished (a later probe's data error lost them all)
        if out is not None and results:
            _write(out, name, shown, {**earlier, **results}, start)
            log.warning("kept the %d finished probe%s (%s) in %s", len(results), "s" if len(results) > 1 else "",
                        ", ".join(results), out / "results.json")
        raise
    report = _write(out, name, shown, {**earlier, **results}, start)
    if set(earlier) - set(results):
        log.info("%s also holds the earlier results of %s for %s", out / "results.json", name,
                 ", ".join(p for p in earlier if p not in results))
    return report


def _earlier_results(out: Path | None, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The figures and the options of the probes an earlier run into ``out`` recorded for the same encoder (a
    second probe verb into the same --out had replaced the first one's results); a ConfigError when ``out``
    holds another encoder's results."""
    path = None if out is None else out / "results.json"
    if path is None or not path.is_file():
        return {}, {}
    try:
        earlier = json.loads(path.read_text())
        earlier_name, probes = earlier["name"], dict(earlier["probes"])
        options = {probe: dict(earlier["suite"]["probes"][probe]) for probe in probes}
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a results file of wildssl eval; give another --out") from None
    if earlier_name != name:
        raise ConfigError(f"{path} holds the results of {earlier_name}, not of {name}; give another --out (the "
                          "results of two encoders are not mixed in one file)")
    return probes, options


def _write(out: Path | None, name: str, suite: dict, results: dict, start: float) -> dict:
    report = {"name": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "suite": suite, "probes": results,
              "seconds": round(time.perf_counter() - start, 1)}
    if out is not None:
        atomic_write_text(out / "results.json", json.dumps(report, indent=1))
        write_markdown(report, out)
    return report


def _run_probes(suite: dict, context: ProbeContext, name: str, results: dict) -> None:
    for probe, options in suite["probes"].items():
        if suite["load_size"] is not None:
            options = {"load_size": suite["load_size"], **options}
        log.info("evaluating %s: %s probe", name, probe)
        if options.get("train") and options.get("test") and same_data(str(options["train"]), str(options["test"])):
            log.warning("%s probe: its test images are its training images (%s), so the figure says nothing about "
                        "new images; give a held-out --test", probe, options["test"])
        began = time.perf_counter()
        context.name = probe
        figures = PROBES[probe_kind(probe)][1](context, options)
        results[probe] = {**figures, "seconds": round(time.perf_counter() - began, 1)}


def headline(probe: str, figures: dict) -> dict[str, float]:
    """The headline figures of one probe's results (those it has)."""
    return {key: figures[key] for key in HEADLINES[probe_kind(probe)] if key in figures}


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def write_markdown(report: dict, out: Path) -> Path:
    """``report.md``: headline table, then per probe its settings, figures and plots."""
    pictures = write_plots(report, out)
    lines = [f"# Evaluation of {report['name']}", "",
             f"Date {report['date']}; total wall time {report['seconds']:.1f} s. Figures in percent.", "",
             "| probe | figures | wall time (s) |", "|---|---|---|"]
    for probe, figures in report["probes"].items():
        shown = ", ".join(f"{k} {_percent(v)}" for k, v in headline(probe, figures).items())
        lines.append(f"| {probe} | {shown} | {figures['seconds']:.1f} |")
    for probe, figures in report["probes"].items():
        lines += ["", f"## {probe}", "", "```", json.dumps(report["suite"]["probes"][probe]), "```", ""]
        for key, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"- {key}: {value:.4f}" if isinstance(value, float) else f"- {key}: {value}")
        if "grid" in figures:
            keys = [k for k in figures["grid"][0] if k != "val"]
            lines += ["", "| " + " | ".join(keys) + " | held-out score |", "|" + "---|" * (len(keys) + 1)]
            for row in figures["grid"]:
                score = "-" if row["val"] is None else _percent(row["val"])
                lines.append("| " + " | ".join(str(row[k]) for k in keys) + f" | {score} |")
        for picture in figures.get("pictures", []) + pictures.get(probe, []):
            lines += ["", f"![{probe}]({picture})"]
    if pictures.get("_missing"):
        lines += ["", "Plots were not drawn: matplotlib is not installed (pip install wildssl[plot])."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plots(report: dict, out: Path) -> dict[str, list[str]]:
    """One PNG per trained probe, ``<probe>_curves.png``: held-out score per setting, training loss per
    epoch of the final fit, and the test confusion matrix where there is one. Returns ``{probe: [file
    names]}`` (``{"_missing": ...}`` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"_missing": ["matplotlib"]}
    written: dict[str, list[str]] = {}
    for probe, figures in report["probes"].items():
        if "grid" not in figures or "loss_curve" not in figures:
            continue
        panels = 3 if "confusion" in figures else 2
        figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
        series: dict[str, list[tuple[float, float]]] = {}
        for row in figures["grid"]:
            if row["val"] is not None:
                series.setdefault(row.get("pool", probe), []).append((row["lr"], row["val"]))
        for label, points in series.items():
            axes[0].plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=label)
        axes[0].set_xscale("log")
        axes[0].set(xlabel="learning rate", ylabel="held-out score (%)", title="selection")
        if series:
            axes[0].legend(fontsize=8)
        axes[1].plot(range(1, len(figures["loss_curve"]) + 1), figures["loss_curve"])
        axes[1].set(xlabel="epoch", ylabel="training loss", title="final fit")
        for axis in axes[:2]:
            axis.grid(alpha=0.3)
        if "confusion" in figures:
            confusion = figures["confusion"]
            classes = figures.get("classes") or [str(i) for i in range(len(confusion))]
            axes[2].imshow(confusion, cmap="Blues")
            axes[2].set_xticks(range(len(confusion)), classes, rotation=90, fontsize=7)
            axes[2].set_yticks(range(len(confusion)), classes, fontsize=7)
            axes[2].set(xlabel="predicted", ylabel="true", title="test confusion")
        figure.suptitle(f"{probe} probe")
        figure.tight_layout()
        name = f"{probe.replace('@', '_')}_curves.png"
        figure.savefig(out / name, dpi=80)
        plt.close(figure)
        written[probe] = [name]
    return written
