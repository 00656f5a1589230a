"""A benchmark suite file: the comparison of one seed table, at the scales this project's machines finish.

.. code-block:: yaml

    name: object_centric          # the suite's name (the output folder's default name)
    mirrors: seed 000 Tables 1-2  # the seed table it is the analogue of
    direction: AB_SimCLR > SimCLR by ... # the seed's result: who beat whom, by how much
    network: auto                 # auto | teacher | student: the network every entry is evaluated with
    seeds: 3                      # seeds per entry (0, 1, ...); --seeds overrides it
    data:                         # names used below -> a prepared data set (wildssl.benchmark.prepare) or a SPEC
      cifar_train: cifar10:train
      cifar_test: cifar10:test
    scales:                       # per scale: images seen by every entry, and --set overrides of every entry
      cpu: {images: 320000, set: [model.depth=4, ...], probes: {linear: {epochs: 10}}}
      gpu: {images: 2000000, set: [...]}
    entries:                      # one row of the table each
      - label: simclr             # unique; the run folders are runs/<label>-s<seed>
        recipe: simclr_quick      # a shipped recipe or a YAML file
        set: [method.crop_size=32]   # --set overrides of this entry (after the scale's)
        streams: {train: cifar_train}  # data.<stream> of the method, by data name
        init_from: null           # label of an earlier entry whose encoder (same seed) sets model.init_from
        seeds: null               # at most this many seeds for this entry (default: all of the suite's)
    probes:                       # wildssl eval all probes (wildssl.eval.report), data by name; plus
      knn: {train: cifar_train, test: cifar_test}   # ``zeroshot: {data: NAME}`` for image-text entries
    knn_curve: {train: cifar_train, test: cifar_test, points: 4}  # the engine's online k-NN over steps
    metrics: [neighbour_ratio]    # last logged value of these training metrics, as table columns

``--scale tiny`` needs no ``scales.tiny``: every prepared data set becomes a small ``synthetic:scenes``
set and every model a 1-block ViT (:mod:`wildssl.benchmark.tiny`); a suite may still give
``scales.tiny`` to add overrides.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from wildssl.errors import ConfigError
from wildssl.schema import load_yaml

SCALES = ("tiny", "cpu", "gpu")
FLOOR = "random_init"  # the label of every suite's random-init floor row (one run per seed)
NETWORKS = ("auto", "teacher", "student")
SUITE_KEYS = ("name", "mirrors", "direction", "network", "seeds", "data", "scales", "entries", "probes",
              "knn_curve", "metrics", "notes")
SCALE_KEYS = ("images", "set", "probes", "data")
ENTRY_KEYS = ("label", "recipe", "set", "streams", "init_from", "seeds", "notes")
CURVE_KEYS = ("train", "test", "points")
# probes the harness runs itself (not through wildssl eval all): they need the whole method, not an encoder
METHOD_PROBES = ("zeroshot",)
ZEROSHOT_KEYS = ("data", "image_size")


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _check_keys(tree: Any, valid: tuple[str, ...], where: str) -> dict:
    if not isinstance(tree, dict):
        raise _fail(where, f"must be a mapping with keys among {', '.join(valid)}, got {tree!r}")
    unknown = sorted(set(tree) - set(valid))
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
    return tree


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise _fail(where, f"must be a list of 'key=value' overrides, got {value!r}")
    return list(value)


# where a suite given by name (``object_centric``) is looked for: the current folder's benchmarks/suites, then the
# source checkout's (an editable install); a pip-installed wildssl ships no suites
SUITE_FOLDERS = (Path("benchmarks") / "suites", Path(__file__).resolve().parents[3] / "benchmarks" / "suites")


def read_suite(path: str | Path) -> dict:
    """(See :func:`check_suite`.) ``path``: a suite file, or the name of a shipped suite (``object_centric``, found in
    ``SUITE_FOLDERS``). Recipe YAML paths are relative to the suite file's folder."""
    return _read(suite_path(path))


def suite_path(spec: str | Path) -> Path:
    """The suite file ``spec`` names: the file itself, or for a bare name the shipped suite of that name; a
    ConfigError naming the shipped suites (and the closest one) when there is none."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = {}
    for folder in SUITE_FOLDERS:
        for file in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            shipped.setdefault(file.stem, file)
    if path.parent == Path(".") and path.suffix == "" and path.name in shipped:
        return shipped[path.name]
    if not shipped:
        raise ConfigError(f"suite file not found: {path} (the shipped suites are benchmarks/suites/*.yaml of a "
                          "wildssl checkout; give the path of one)")
    close = difflib.get_close_matches(path.stem, list(shipped), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"suite file not found: {path} (a path, or the name of a shipped suite: "
                      f"{', '.join(sorted(shipped))}{hint})")


def _read(path: Path) -> dict:
    """The suite at ``path`` checked and with its defaults filled in; every mistake is one ConfigError line."""
    try:
        tree = load_yaml(path.read_text()) or {}  # as recipes are read
    except yaml.YAMLError as error:
        raise ConfigError(f"suite {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    suite = check_suite(tree, str(path))
    for entry in suite["entries"]:
        recipe = Path(entry["recipe"])
        if recipe.suffix in (".yaml", ".yml") and not recipe.is_absolute():
            entry["recipe"] = str(path.parent / recipe)
    return suite


def check_suite(tree: Any, where: str = "suite") -> dict:
    """:func:`read_suite` on an already parsed tree."""
    tree = dict(_check_keys(tree, SUITE_KEYS, where))
    for key in ("name", "entries", "probes"):
        if not tree.get(key):
            raise _fail(where, f"needs {key!r} (see wildssl.benchmark.suite for the format)")
    suite: dict[str, Any] = {"name": str(tree["name"]), "mirrors": str(tree.get("mirrors") or ""),
                             "direction": str(tree.get("direction") or ""), "notes": str(tree.get("notes") or "")}
    suite["network"] = tree.get("network", "auto")
    if suite["network"] not in NETWORKS:
        raise _fail(where, f"network must be one of {', '.join(NETWORKS)}, got {suite['network']!r}")
    suite["seeds"] = tree.get("seeds", 1)
    if not isinstance(suite["seeds"], int) or isinstance(suite["seeds"], bool) or suite["seeds"] < 1:
        raise _fail(where, f"seeds must be an integer >= 1, got {suite['seeds']!r}")
    data = tree.get("data") or {}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise _fail(f"{where} data", "must map names to prepared data sets (e.g. cifar10:train) or data SPECs")
    suite["data"] = dict(data)
    scales = _check_keys(tree.get("scales") or {}, SCALES, f"{where} scales")
    suite["scales"] = {}
    for scale in SCALES:
        spec = _check_keys(scales.get(scale) or {}, SCALE_KEYS, f"{where} scales.{scale}")
        images = spec.get("images")
        if images is not None and (not isinstance(images, int) or images < 1):
            raise _fail(f"{where} scales.{scale}.images", f"must be an integer >= 1 (images seen), got {images!r}")
        suite["scales"][scale] = {"images": images, "set": _string_list(spec.get("set"), f"{where} scales.{scale}.set"),
                                  "probes": dict(spec.get("probes") or {}), "data": dict(spec.get("data") or {})}
        for name in suite["scales"][scale]["data"]:
            if name not in suite["data"]:
                raise _fail(f"{where} scales.{scale}.data", f"{name!r} is not a name under data:")
    if not isinstance(tree["entries"], list):
        raise _fail(f"{where} entries", "must be a list of entries (label, recipe, set, streams)")
    suite["entries"], labels = [], []
    for index, raw in enumerate(tree["entries"]):
        entry = _check_keys(raw, ENTRY_KEYS, f"{where} entries[{index}]")
        label, recipe = entry.get("label"), entry.get("recipe")
        here = f"{where} entry {label or index}"
        if not isinstance(label, str) or not label or not all(c.isalnum() or c in "_.+" for c in label):
            raise _fail(here, f"label must be a non-empty name of letters, digits, '_', '.' or '+', got {label!r}")
        if label in labels or label == "random_init":
            raise _fail(here, f"label {label!r} is used twice (or is the floor's own name, random_init)")
        if not isinstance(recipe, str) or not recipe:
            raise _fail(here, "needs a recipe (a shipped recipe name, see wildssl recipes, or a YAML file)")
        streams = entry.get("streams") or {}
        if not isinstance(streams, dict) or not streams:
            raise _fail(here, "needs streams: {stream: data name} (e.g. {train: cifar_train})")
        for stream, name in streams.items():
            if name not in suite["data"]:
                raise _fail(here, f"stream {stream} reads {name!r}, which is not a name under data: "
                                  f"({', '.join(suite['data']) or 'none'})")
        init_from = entry.get("init_from")
        if init_from is not None and init_from not in labels:
            raise _fail(here, f"init_from {init_from!r} must name an entry listed before it ({', '.join(labels)})")
        seeds = entry.get("seeds")
        if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1):
            raise _fail(here, f"seeds must be an integer >= 1 (at most that many of the suite's seeds), got {seeds!r}")
        labels.append(label)
        suite["entries"].append({"label": label, "recipe": recipe, "set": _string_list(entry.get("set"), f"{here} set"),
                                 "streams": dict(streams), "init_from": init_from, "seeds": seeds,
                                 "notes": str(entry.get("notes") or "")})
    suite["probes"] = _check_probes(tree["probes"], suite["data"], f"{where} probes")
    for scale in SCALES:
        for probe, options in suite["scales"][scale]["probes"].items():
            if probe not in suite["probes"] or not isinstance(options, dict):
                raise _fail(f"{where} scales.{scale}.probes", f"{probe!r} must be a probe of the suite's probes: "
                                                              "with a mapping of options")
            _check_probes({probe: {**suite["probes"][probe], **options}}, suite["data"],
                          f"{where} scales.{scale}.probes")
    curve = tree.get("knn_curve")
    if curve is not None:
        curve = dict(_check_keys(curve, CURVE_KEYS, f"{where} knn_curve"))
        for key in ("train", "test"):
            if curve.get(key) not in suite["data"]:
                raise _fail(f"{where} knn_curve", f"{key} must be a name under data:, got {curve.get(key)!r}")
        points = curve.setdefault("points", 4)
        if not isinstance(points, int) or isinstance(points, bool) or points < 1:
            raise _fail(f"{where} knn_curve", f"points must be an integer >= 1 (k-NN points over a run), got "
                                              f"{points!r}")
    suite["knn_curve"] = curve
    metrics = tree.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise _fail(f"{where} metrics", f"must be a list of logged metric names, got {metrics!r}")
    suite["metrics"] = metrics
    return suite


def _check_probes(probes: Any, data: dict[str, str], where: str) -> dict:
    from wildssl.eval.report import PROBES, probe_kind

    if not isinstance(probes, dict):
        raise _fail(where, f"must map probe names to options; probes: {', '.join([*PROBES, *METHOD_PROBES])}")
    checked = {}
    for name, options in probes.items():
        kind = probe_kind(name)
        if kind not in PROBES and kind not in METHOD_PROBES:
            raise _fail(where, f"unknown probe {name!r}; valid probes: {', '.join([*PROBES, *METHOD_PROBES])}")
        options = dict(options or {})
        valid = ZEROSHOT_KEYS if kind in METHOD_PROBES else (*PROBES[kind][0], "image_size", "load_size")
        _check_keys(options, tuple(valid), f"{where}.{name}")
        for key in ("train", "test", "data"):
            if key in options and options[key] not in data:
                raise _fail(f"{where}.{name}", f"{key} must be a name under data:, got {options[key]!r}")
        checked[name] = options
    return checked
