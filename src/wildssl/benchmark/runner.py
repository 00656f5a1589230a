"""``wildssl benchmark run``: train every (entry, seed) of a suite at equal images seen, evaluate each encoder
and the random-init floor with the same probes and network, and record every run as it finishes.

Layout of the output folder ``DIR``::

    suite.json                    the resolved suite, scale, seeds, command, device, data SPECs
    runs/<label>-s<seed>/settings.json     the run's resolved config (data as the suite's names), written before training
    runs/<label>-s<seed>/train/   the training run (checkpoint, config.yaml, metrics.jsonl)
    runs/<label>-s<seed>/train_done.json   the engine's summary, written when training finished
    runs/<label>-s<seed>/train_sessions.json   the seconds of the training's earlier (interrupted) sessions
    runs/<label>-s<seed>/eval/    the wildssl eval all report of the encoder
    runs/<label>-s<seed>/result.json       the run's figures, written last (atomically)
    runs/random_init-s<seed>/result.json   the floor: the first entry's architecture at its initial weights
    results.json, table.md, probes.png, knn_curve.png   (wildssl.benchmark.table)

Resuming (the same command again): a run with ``result.json`` is skipped; one with ``train_done.json``
is only evaluated again; any other resumes from its training checkpoint (``train.checkpoint_every``) or
starts over. A recorded run whose resolved config differs from the suite's now (another budget, override or
edited recipe) is an error naming the run and the changed keys: resuming never mixes two settings in one table.
So is a recorded run evaluated with other probes, network or metrics (deleting its ``result.json`` evaluates it
again, training kept), a data name that now points at other data, and a floor recorded for another first entry.
A run's ``train_seconds`` is the sum over the sessions that trained it. A non-empty ``--out`` without
``suite.json`` is refused: the runner writes only into its own folders.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from wildssl.benchmark import tiny
from wildssl.benchmark.prepare import is_prepared_name, prepare
from wildssl.benchmark.suite import FLOOR, METHOD_PROBES, SCALES, read_suite
from wildssl.errors import ConfigError
from wildssl.io import atomic_write_text

log = logging.getLogger("wildssl")

RESULT = "result.json"
SETTINGS = "settings.json"
TRAIN_DONE = "train_done.json"
SESSIONS = "train_sessions.json"  # the seconds of the earlier (interrupted) sessions of a run's training
OWN = {"data"}  # what a first run may leave in its --out before suite.json (the prepared data sets)
RUN_OVERRIDES = ["train.progress=false", "train.tensorboard=false"]


def write_json(path: Path, value) -> None:
    """Write ``value`` as JSON to ``path`` atomically: a killed write never leaves a half file."""
    atomic_write_text(path, json.dumps(value, indent=1))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {torch.get_num_threads()} torch threads"


def resolve_data(suite: dict, scale: str, shared: str | Path | None, data_dir: Path) -> dict[str, str]:
    """``{data name: SPEC}`` of the suite at ``scale``: prepared sets converted from the shared data (tiny:
    synthetic stand-ins), SPECs as given; ``scales.<scale>.data`` replaces names for that scale."""
    values = suite_data(suite, scale)
    specs = {}
    for name, value in values.items():
        if scale == "tiny":
            specs[name] = tiny.data_spec(value)
        elif is_prepared_name(value):
            specs[name] = prepare(value, shared, data_dir)
        else:
            check_not_a_misspelt_set(value, name, suite["name"])
            specs[name] = value
    return specs


def check_not_a_misspelt_set(value: str, name: str, suite_name: str) -> None:
    """A ConfigError for a data value named like a prepared set that is none (``cifar10:trian``): it would be
    taken as a path and fail once a run had started, as "data path not found"."""
    import difflib

    from wildssl.benchmark.prepare import CATALOGUE

    families = {set_name.split(":")[0] for set_name in CATALOGUE}
    if value.split(":")[0] not in families or Path(value).exists():
        return
    close = difflib.get_close_matches(value, list(CATALOGUE), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"suite {suite_name} data {name}: {value!r} is no prepared data set; {hint}prepared sets: "
                      f"{', '.join(CATALOGUE)} (or a data SPEC such as a folder or synthetic:scenes?n=...)")


def run_dir(out: Path, label: str, seed: int) -> Path:
    return out / "runs" / f"{label}-s{seed}"


def entry_config(suite: dict, entry: dict, scale: str, seed: int, specs: dict[str, str],
                 out: Path) -> tuple[dict, list[str]]:
    """The resolved training config of ``entry`` at ``scale`` and ``seed`` and the ``--set`` overrides it is
    built from (unknown recipes and keys are ConfigErrors naming the entry). Order: recipe, the scale's
    overrides, the entry's, the streams, then the harness's (images seen, seed, network, k-NN curve; at tiny
    scale the tiny profile)."""
    from wildssl.methods import get_method_class
    from wildssl.train.config import build_config

    where = f"suite {suite['name']} entry {entry['label']}"
    images = suite["scales"][scale]["images"] or (tiny.IMAGES if scale == "tiny" else None)
    if images is None:
        raise ConfigError(f"{where}: the suite gives no scales.{scale}.images (images seen per entry at this scale)")
    overrides = suite["scales"][scale]["set"] + entry["set"]
    try:
        method = build_config(entry["recipe"], overrides)["method"]["name"]
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    unknown = [stream for stream in entry["streams"] if stream not in get_method_class(method).streams]
    if unknown:  # else "unknown config key data.<stream> in --set", which the suite file does not say
        raise ConfigError(f"{where}: streams: {unknown[0]!r} is not a stream of method {method}; its streams: "
                          f"{', '.join(get_method_class(method).streams)}")
    overrides += [f"data.{stream}={specs[name]}" for stream, name in entry["streams"].items()]
    if entry["init_from"]:
        overrides.append(f"model.init_from={run_dir(out, entry['init_from'], seed) / 'train'}")
    if scale == "tiny":
        overrides += tiny.MODEL + tiny.method_overrides(method)
    overrides += RUN_OVERRIDES + [f"train.images={images}", f"train.seed={seed}", f"eval.encoder={suite['network']}"]
    curve = suite["knn_curve"]
    if curve:
        batch = build_config(entry["recipe"], overrides)["train"]["batch_size"]
        points = 1 if scale == "tiny" else curve["points"]  # tiny: the floor and the end only
        every = max(1, images // (batch * points))
        overrides += [f"eval.knn_train={specs[curve['train']]}", f"eval.knn_test={specs[curve['test']]}",
                      f"eval.knn_every={every}"]
    else:
        overrides.append("eval.knn_every=0")
    config = build_config(entry["recipe"], overrides)
    missing = [s for s in get_method_class(method).streams if s not in entry["streams"]]
    if missing:
        raise ConfigError(f"{where}: method {method} reads streams {', '.join(get_method_class(method).streams)}; "
                          f"give streams: {{{missing[0]}: <data name>}} too (the recipe's default would be used)")
    return config, overrides


def probe_suite(suite: dict, scale: str, specs: dict[str, str], seed: int) -> tuple[dict, dict]:
    """(the ``wildssl eval all`` suite of the encoder probes, the method probes), data names as SPECs and
    the scale's probe options applied (tiny: one quick fit each, :data:`wildssl.benchmark.tiny.PROBES`)."""
    from wildssl.eval.report import probe_kind

    encoder_probes, method_probes = {}, {}
    for name, options in suite["probes"].items():
        kind = probe_kind(name)
        # the suite's options, then (tiny) one quick fit, then the scale's own options for this probe
        options = {**options, **(tiny.PROBES.get(kind, {}) if scale == "tiny" else {}),
                   **suite["scales"][scale]["probes"].get(name, {})}
        options = {k: specs[v] if k in ("train", "test", "data") else v for k, v in options.items()}
        (method_probes if kind in METHOD_PROBES else encoder_probes)[name] = options
    return {"image_size": None, "batch_size": 256, "seed": seed, "probes": encoder_probes}, method_probes


def scalar_figures(figures: dict) -> dict:
    """The numbers of a probe's results (the grids, curves and matrices stay in the eval report)."""
    return {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluate_encoder(encoder, eval_suite: dict, out: Path | None, name: str) -> dict:
    """The scalar figures of every encoder probe; the eval report (with its plots) goes to ``out`` unless None."""
    from wildssl.eval.cache import FeatureStore
    from wildssl.eval.report import run_suite
    from wildssl.train.engine import pick_device

    if not eval_suite["probes"]:
        return {}
    store = FeatureStore(encoder, pick_device(), None)
    report = run_suite(store, eval_suite, out, name=name)
    return {probe: scalar_figures(figures) for probe, figures in report["probes"].items()}


def suite_teacher(suite: dict) -> bool | None:
    """The suite's ``network`` as :func:`~wildssl.models.loading.load_encoder`'s ``teacher`` (None: auto)."""
    return None if suite["network"] == "auto" else suite["network"] == "teacher"


def evaluate_run(encoder, name: str, folder: Path, suite: dict, scale: str, specs: dict,
                 seed: int) -> tuple[dict, dict]:
    """(the scalar figures of every encoder probe of ``encoder``, the suite's method probes) for the run in
    ``folder``; its eval report goes to ``folder / "eval"`` (none at tiny scale: seconds per suite), replacing
    the half-written one a killed evaluation may have left."""
    eval_suite, method_probes = probe_suite(suite, scale, specs, seed)
    if (folder / "eval").exists():
        shutil.rmtree(folder / "eval")
    report_dir = None if scale == "tiny" else folder / "eval"
    return evaluate_encoder(encoder, eval_suite, report_dir, name), method_probes


def evaluate_method_probes(train_dir: Path, method_name: str, method_probes: dict) -> dict:
    """Zero-shot of image-text runs; other methods get ``{"skipped": reason}``."""
    from wildssl.eval.zeroshot import load_image_text_model, zeroshot_classify
    from wildssl.methods import get_method_class
    from wildssl.methods.clip import CLIP
    from wildssl.train.engine import pick_device

    results = {}
    for name, options in method_probes.items():
        if not issubclass(get_method_class(method_name), CLIP):
            results[name] = {"skipped": f"{method_name} has no text tower"}
            continue
        method = load_image_text_model(train_dir)
        began = time.perf_counter()
        figures = zeroshot_classify(method, options["data"], image_size=options.get("image_size"), device=pick_device())
        results[name] = {**figures, "seconds": round(time.perf_counter() - began, 1)}
    return results


def knn_curve(train_dir: Path) -> list[list[float]]:
    """``[[step, k-NN top-1], ...]`` of the engine's online k-NN (step 0: the random initialization)."""
    from wildssl.io import read_metrics

    curve = []
    for record in read_metrics(train_dir):
        if "knn_top1_random_init" in record:
            curve.append([record["step"], record["knn_top1_random_init"]])
        elif "knn_top1" in record:
            curve.append([record["step"], record["knn_top1"]])
    return curve


def last_metrics(train_dir: Path, keys: list[str]) -> dict[str, float]:
    from wildssl.io import read_metrics

    found: dict[str, float] = {}
    for record in read_metrics(train_dir):
        found.update({k: record[k] for k in keys if k in record})
    return found


def train_entry(config: dict, folder: Path) -> dict:
    """Train (or resume) one run into ``folder / "train"``; the engine's summary with the wall time of the
    training (``seconds``: every session that trained it, ``session_seconds``: each). A session that ends
    early (Ctrl-C, an error) records its seconds in ``train_sessions.json`` for the session that resumes it; one
    killed outright (SIGKILL, power loss) left only its start there and counts until its last checkpoint was
    written. A run that starts over (no checkpoint) forgets them."""
    from wildssl.benchmark.table import read_record
    from wildssl.eval.evaluate import make_online_knn
    from wildssl.train import engine
    from wildssl.train.run import run_checkpoint_path

    began = time.perf_counter()
    checkpoint = run_checkpoint_path(config, folder / "train")
    resume = checkpoint.is_file()  # a killed suite's run continues
    earlier = read_record(folder / SESSIONS) if resume and (folder / SESSIONS).is_file() else []
    earlier = [s if isinstance(s, (int, float)) else round(max(0.0, checkpoint.stat().st_mtime - s["began"]), 1)
               for s in earlier]
    write_json(folder / SESSIONS, earlier + [{"began": time.time()}])
    try:
        summary = engine.train(config, folder / "train", resume=resume,
                               knn_evaluator=make_online_knn(config, engine.pick_device()))
    except BaseException:
        write_json(folder / SESSIONS, earlier + [round(time.perf_counter() - began, 1)])
        raise
    sessions = earlier + [round(time.perf_counter() - began, 1)]
    summary["seconds"], summary["session_seconds"] = round(sum(sessions), 1), sessions
    return summary


def _spec_names(specs: dict[str, str]) -> dict[str, str]:
    """{SPEC: the suite's data name}; names of one SPEC (the same data): the first in sorted order."""
    names: dict[str, str] = {}
    for name, spec in sorted(specs.items()):
        names.setdefault(spec, name)
    return names


def comparable_settings(overrides: list[str], specs: dict[str, str]) -> list[str]:
    """``overrides`` with each data SPEC written as the suite's data name and without ``model.init_from`` (a path
    under the output folder; the entry's ``init_from`` label is part of the suite)."""
    names = _spec_names(specs)
    settings = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key != "model.init_from":
            settings.append(f"{key}={names.get(value, value)}")
    return settings


# What the floor's network at its initial weights depends on: the architecture, the method (its heads and
# teacher), the seed. Not the budget, the optimizer or the data: changing those leaves the floor as it was.
FLOOR_KEYS = ("model.", "method.", "train.seed=")


def comparable_config(config: dict, specs: dict[str, str], keys: tuple[str, ...] = ("",)) -> list[str]:
    """The resolved training config as sorted ``key.path=value`` lines (those starting with one of ``keys``), data
    SPECs as the suite's names and without ``model.init_from``: what must match on resume (it also catches an edited
    recipe file)."""
    names = _spec_names(specs)

    def lines(value, prefix: str):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from lines(item, f"{prefix}{key}.")
        elif prefix[:-1] != "model.init_from":
            shown = names.get(value, value) if isinstance(value, str) else json.dumps(value)
            yield f"{prefix[:-1]}={shown}"

    return sorted(line for line in lines(config, "") if line.startswith(keys))


def recorded_settings(folder: Path, recorded_specs: dict[str, str]) -> tuple[str, list[str]] | None:
    """("config" or "overrides", the settings a run in ``folder`` was started with): its ``settings.json`` (the
    resolved config), else (runs recorded before it existed) the overrides of its ``result.json`` read with the data
    SPECs the output folder recorded; None when nothing was recorded."""
    from wildssl.benchmark.table import read_record

    if (folder / SETTINGS).is_file():
        return "config", read_record(folder / SETTINGS)["config"]
    if (folder / RESULT).is_file():
        return "overrides", comparable_settings(read_record(folder / RESULT)["overrides"], recorded_specs)
    return None


def describe_change(before: list[str], now: list[str], most: int = 4) -> str:
    """``key: old then, new now; ...`` for the keys whose ``key=value`` lines differ (at most ``most`` named)."""
    def as_dict(lines: list[str]) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in lines)

    then, later = as_dict(before), as_dict(now)
    keys = [k for k in dict.fromkeys([*then, *later]) if then.get(k) != later.get(k)]
    keys.sort(key=lambda k: k != "method.name")  # another method: its other keys differ too, and say less
    parts = [f"{k}: {then.get(k, '(unset)')} then, {later.get(k, '(unset)')} now" for k in keys[:most]]
    if len(keys) > most:
        parts.append(f"and {len(keys) - most} more")
    return "; ".join(parts) or "the same settings in another order"


def check_recorded_settings(out: Path, configs: dict, specs: dict[str, str], recorded_specs: dict[str, str]) -> None:
    """ConfigError when a recorded run of ``configs`` was started with other settings than it would be now."""
    for (label, seed), (config, overrides) in configs.items():
        folder = run_dir(out, label, seed)
        recorded = recorded_settings(folder, recorded_specs)
        if recorded is None:
            continue
        kind, before = recorded
        keys = FLOOR_KEYS if label == FLOOR else ("",)
        now = comparable_config(config, specs, keys) if kind == "config" else comparable_settings(overrides, specs)
        if before == now:
            continue
        change = describe_change(before, now)
        raise ConfigError(f"{folder} was recorded with other settings than the suite gives now ({change}); "
                          f"delete that run folder to run it again, or give another --out")


def suite_data(suite: dict, scale: str) -> dict[str, str]:
    """``{data name: value}`` as the suite gives it at ``scale`` (a prepared set's name or a SPEC, before it is
    resolved to a path that depends on the output folder)."""
    return {**suite["data"], **suite["scales"][scale]["data"]}


def check_recorded_data(out: Path, suite: dict, scale: str, previous: dict) -> None:
    """ConfigError when a data name of the suite now points at other data than when the runs in ``out`` were
    recorded: the runs compare configs by data name, so the new runs would be tabled with the old ones."""
    if not previous or not any(path.is_dir() for path in (out / "runs").glob("*")):
        return
    then, now = suite_data(previous["suite"], scale), suite_data(suite, scale)
    changed = [name for name in now if name in then and then[name] != now[name]]
    if changed:
        name = changed[0]
        raise ConfigError(f"{out} holds runs recorded with data {name} = {then[name]!r}, and the suite now gives "
                          f"{now[name]!r}; their figures would be tabled together: give another --out, or delete "
                          f"{out / 'runs'} to run the suite again on the new data")


def evaluation_settings(suite: dict, scale: str) -> list[str]:
    """What a run's figures depend on besides its training, as sorted ``key=value`` lines: the network evaluated,
    every probe with its options at ``scale`` (data by the suite's names) and the training metrics tabled. (The
    ``knn_curve`` is part of each run's training config.)"""
    lines = [f"network={suite['network']}", f"metrics={json.dumps(suite['metrics'])}"]
    for name, options in suite["probes"].items():
        options = {**options, **suite["scales"][scale]["probes"].get(name, {})}
        lines.append(f"probes.{name}={json.dumps(options, sort_keys=True)}")
    return sorted(lines)


def check_recorded_evaluation(out: Path, jobs: list[tuple[str, int]], suite: dict, scale: str,
                              previous: dict) -> None:
    """ConfigError when a recorded run of ``jobs`` was evaluated with other probes, network or metrics than the
    suite gives now (its ``result.json``'s ``evaluation``; runs recorded before it existed: the suite of
    ``suite.json``): its figures would be shown under the new settings."""
    from wildssl.benchmark.table import read_record

    now = evaluation_settings(suite, scale)
    for label, seed in jobs:
        path = run_dir(out, label, seed) / RESULT
        if not path.is_file():
            continue
        before = read_record(path).get("evaluation")
        if before is None:
            before = evaluation_settings(previous["suite"], scale) if previous else now
        if before != now:
            raise ConfigError(f"{path.parent} was evaluated with other probes than the suite gives now "
                              f"({describe_change(before, now)}); delete {out / 'runs'}/*/{RESULT} to evaluate "
                              f"the recorded runs again (their training is kept), or give another --out")


def entry_methods(configs: dict) -> dict[str, tuple[dict, object]]:
    """``{label: (config, method)}``: each entry's method built once on the meta device (shapes only: no weights,
    ``model.init_from`` not read, since an entry's run may start from one not trained yet), from its first seed's
    config, for the checks made before any training."""
    from wildssl.methods import build_meta_method

    methods = {}
    for (label, _), (config, _) in configs.items():
        if label not in methods:
            methods[label] = (config, build_meta_method(config))
    return methods


def check_networks(suite: dict, methods: dict) -> None:
    """ConfigError naming the first entry whose method has no teacher when the suite evaluates ``network:
    teacher``."""
    if suite["network"] != "teacher":
        return
    for label, (config, method) in methods.items():
        if method.teacher is None:
            raise ConfigError(f"suite {suite['name']} entry {label}: method {config['method']['name']} has no "
                              f"teacher encoder, but the suite evaluates network: teacher; give network: auto "
                              f"(each method's own network) or student, or leave the entry out")


def check_entry_data(suite: dict, methods: dict) -> None:
    """Each entry's :meth:`Method.check_data` on its streams (a CLIP entry on images without captions), so that
    the suite fails before its first run, not when that entry's turn comes; the error names the entry."""
    from wildssl.data import open_source
    from wildssl.errors import DataError
    from wildssl.methods.base import Method

    for label, (config, method) in methods.items():
        if type(method).check_data is Method.check_data:
            continue
        sources = {name: open_source(config["data"][name], load_size=config["data"]["load_size"], stream=True)
                   for name in type(method).streams}
        try:
            method.check_data(sources)
        except DataError as error:
            raise DataError(f"suite {suite['name']} entry {label}: {error}") from None


def images_seen(config: dict, method) -> tuple[int, int]:
    """(steps, images a step, all streams) of a run whose length is ``train.images``: the budget is rounded up to
    whole steps, so entries with other batches see other numbers of images."""
    from wildssl.train.run import stream_batch_sizes, total_steps_of

    per_step = sum(stream_batch_sizes(config, method).values())
    return total_steps_of(config, 0, per_step), per_step


def check_images_seen(suite: dict, scale: str, methods: dict) -> None:
    """A warning when the entries do not see the same number of images (the budget rounded up to whole steps of
    different sizes): the comparison is then at unequal budgets, by less than one step each."""
    seen = {label: images_seen(config, method) for label, (config, method) in methods.items()}
    if len({steps * per_step for steps, per_step in seen.values()}) > 1:
        budget = next(iter(methods.values()))[0]["train"]["images"]
        log.warning("suite %s: its entries see different numbers of images, scales.%s.images=%d rounded up to whole "
                    "steps: %s; a multiple of every entry's images a step makes them equal", suite["name"], scale,
                    budget, ", ".join(f"{label} {steps * per_step} ({steps} steps of {per_step})"
                                      for label, (steps, per_step) in seen.items()))


def run_entry(suite: dict, entry: dict, config: dict, overrides: list[str], seed: int, scale: str, specs: dict,
              out: Path) -> dict:
    """Train and evaluate one (entry, seed); returns (and records) its ``result.json``."""
    from wildssl.benchmark.table import read_record
    from wildssl.models.loading import evaluated_network, load_encoder

    folder = run_dir(out, entry["label"], seed)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / SETTINGS).is_file():
        write_json(folder / SETTINGS, {"config": comparable_config(config, specs)})
    done = folder / TRAIN_DONE
    if done.is_file():
        summary = read_record(done)
    else:
        summary = train_entry(config, folder)
        write_json(done, summary)
    train_dir = folder / "train"
    teacher = suite_teacher(suite)
    began = time.perf_counter()
    probes, method_probes = evaluate_run(load_encoder(train_dir, teacher), entry["label"], folder, suite, scale,
                                         specs, seed)
    probes.update(evaluate_method_probes(train_dir, config["method"]["name"], method_probes))
    result = {"label": entry["label"], "seed": seed, "recipe": entry["recipe"], "method": config["method"]["name"],
              "overrides": overrides, "images": config["train"]["images"], "steps": summary["steps"],
              "images_seen": summary["total_steps"] * summary["images_per_step"] if "images_per_step" in summary
              else None,
              "network": evaluated_network(train_dir, teacher), "train_seconds": summary["seconds"],
              "eval_seconds": round(time.perf_counter() - began, 1), "probes": probes,
              "knn_curve": knn_curve(train_dir), "metrics": last_metrics(train_dir, suite["metrics"]),
              "alarms": summary.get("alarms", []), "evaluation": evaluation_settings(suite, scale)}
    write_json(folder / RESULT, result)
    return result


def floor_configs(suite: dict, configs: dict, seeds: list[int], scale: str, specs: dict, out: Path) -> dict:
    """``{(FLOOR, seed): (config, [])}``: the first entry's config at each seed, without ``model.init_from``."""
    first = suite["entries"][0]
    floors = {}
    for seed in seeds:
        config, _ = configs.get((first["label"], seed)) or entry_config(suite, first, scale, seed, specs, out)
        floors[(FLOOR, seed)] = ({**config, "model": {**config["model"], "init_from": None},
                                  "train": {**config["train"], "seed": seed}}, [])
    return floors


def run_floor(suite: dict, config: dict, seed: int, scale: str, specs: dict, out: Path) -> dict:
    """The random-init floor of ``seed``: the first entry's architecture at the initial weights its run
    starts from (the engine seeds with ``train.seed`` before building the method), same probes. ``config``:
    the floor's (:func:`floor_configs`), recorded in ``settings.json`` as an entry's is."""
    from wildssl.methods import build_initial_method

    folder = run_dir(out, FLOOR, seed)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / SETTINGS).is_file():
        write_json(folder / SETTINGS, {"config": comparable_config(config, specs, FLOOR_KEYS)})
    method = build_initial_method(config)
    began = time.perf_counter()
    probes, method_probes = evaluate_run(method.encoder(suite_teacher(suite)).eval(), FLOOR, folder, suite, scale,
                                         specs, seed)
    probes.update({name: {"skipped": "the floor is an encoder without a trained text tower"} for name in method_probes})
    result = {"label": FLOOR, "seed": seed, "recipe": suite["entries"][0]["recipe"], "method": "random init",
              "overrides": [], "images": 0, "steps": 0, "network": f"{method.name} initial weights",
              "train_seconds": 0.0, "eval_seconds": round(time.perf_counter() - began, 1), "probes": probes,
              "knn_curve": [], "metrics": {}, "alarms": [], "evaluation": evaluation_settings(suite, scale)}
    write_json(folder / RESULT, result)
    return result


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_benchmark(suite_path: str | Path, scale: str = "cpu", seeds: int | None = None, out: str | Path | None = None,
                  shared: str | Path | None = None, data_dir: str | Path | None = None,
                  command: str | None = None) -> dict:
    """Run (or resume) the suite at ``suite_path``; returns the results (see :mod:`wildssl.benchmark.table`)."""
    from wildssl.benchmark.table import read_meta, write_outputs

    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    suite = read_suite(suite_path)
    seed_list = list(range(seeds if seeds is not None else suite["seeds"]))
    if not seed_list:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out or Path("runs") / "bench" / f"{suite['name']}-{scale}")
    meta_path = out / "suite.json"
    if out.is_dir() and not meta_path.is_file() and any(p.name not in OWN for p in out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and holds no benchmark run (no suite.json); give a new or "
                          f"empty folder, or the output folder of an earlier wildssl benchmark run")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create --out {out}: {error.strerror or error}; give a writable folder") from None
    previous = {}
    if meta_path.is_file():
        previous = read_meta(meta_path, "delete it to record the suite again (the recorded runs are kept)")
        if previous["scale"] != scale or previous["suite"]["name"] != suite["name"]:
            raise ConfigError(f"{out} holds suite {previous['suite']['name']} at scale {previous['scale']}; resume it "
                              f"with the same suite and --scale, or choose another --out")
    check_recorded_data(out, suite, scale, previous)
    specs = resolve_data(suite, scale, shared, Path(data_dir) if data_dir else out / "data")
    entries = {e["label"]: e for e in suite["entries"]}
    # every config first: an unknown recipe or key fails before any training
    def entry_seeds(entry: dict) -> list[int]:
        return seed_list[:entry["seeds"]] if entry["seeds"] else seed_list

    for entry in suite["entries"]:
        if entry["init_from"] and len(entry_seeds(entry)) > len(entry_seeds(entries[entry["init_from"]])):
            raise ConfigError(f"suite {suite['name']} entry {entry['label']}: it runs more seeds than "
                              f"{entry['init_from']}, whose encoder it starts from; give it seeds <= that entry's")
    configs = {(e["label"], s): entry_config(suite, e, scale, s, specs, out)
               for e in suite["entries"] for s in entry_seeds(e)}
    floors = floor_configs(suite, configs, seed_list, scale, specs, out)
    check_recorded_settings(out, {**configs, **floors}, specs, previous.get("data", specs))
    jobs = [(FLOOR, s) for s in seed_list] + [(e["label"], s) for s in seed_list for e in suite["entries"]
                                              if s in entry_seeds(e)]
    check_recorded_evaluation(out, jobs, suite, scale, previous)
    methods = entry_methods(configs)
    check_networks(suite, methods)
    check_images_seen(suite, scale, methods)
    check_entry_data(suite, methods)
    meta = {"suite": suite, "suite_file": str(suite_path), "scale": scale, "seeds": seed_list,
            "command": command or f"wildssl benchmark run {suite_path} --scale {scale}", "device": device_name(),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "data": specs}
    meta["started"] = previous.get("started", meta["started"])
    write_json(meta_path, meta)
    began, timed = time.perf_counter(), []
    for number, (label, seed) in enumerate(jobs, start=1):
        where = f"[{number}/{len(jobs)}] {suite['name']} {label} seed {seed}"
        if (run_dir(out, label, seed) / RESULT).is_file():
            print(f"{where}: recorded, skipped", file=sys.stderr, flush=True)
            continue
        started = time.perf_counter()
        try:
            if label == FLOOR:
                run_floor(suite, floors[(FLOOR, seed)][0], seed, scale, specs, out)
            else:
                run_entry(suite, entries[label], *configs[(label, seed)], seed, scale, specs, out)
        except KeyboardInterrupt as interrupt:  # the engine's own advice names train --resume
            said = str(interrupt).replace(" (continue with --resume)", "") or "interrupted"
            raise KeyboardInterrupt(f"{where}: {said}; the same command again resumes the suite "
                                    f"(recorded runs are kept)") from None
        timed.append(time.perf_counter() - started)
        left = sum(not (run_dir(out, *job) / RESULT).is_file() for job in jobs[number:])  # not the recorded ones
        eta = sum(timed) / len(timed) * left
        print(f"{where}: {timed[-1]:.1f} s; elapsed {_minutes(time.perf_counter() - began)}; "
              f"ETA {_minutes(eta)} for {left} more", file=sys.stderr, flush=True)
    return write_outputs(out, plots=scale != "tiny")  # tiny: seconds per suite; `report` draws them
