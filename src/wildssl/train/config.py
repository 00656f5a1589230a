"""Configuration: defaults + method defaults + recipe YAML + dotted command-line overrides.

A config is a nested ``dict`` whose keys are fixed by :data:`DEFAULTS` and by the chosen method's
``defaults``. Every key a recipe or ``--set`` names must exist there: a typo is a :class:`ConfigError`
that lists the valid keys, never a silently ignored option. The resolved config is written beside every
run (``config.yaml``) and inside every checkpoint.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from wildssl.data.workers import resolve_num_workers, resolve_prefetch
from wildssl.errors import ConfigError

# Keys shared by every method. ``None`` means "not set" (the engine or method picks a derived value).
DEFAULTS: dict[str, Any] = {
    "method": {"name": "simclr"},
    "model": {
        "name": "small",
        "patch_size": 16,
        "img_size": 224,
        "num_register_tokens": 0,
        "drop_path_rate": 0.0,
        "depth": None,
        "embed_dim": None,
        "num_heads": None,
        "init_from": None,
    },
    "data": {
        "load_size": 224,
        "max_pixels": 40_000_000,  # larger images (pixels decoded, after JPEG's reduced decoding) are skipped
        "num_workers": "auto",  # decoding processes per rank: auto = min(cores per rank - 1, 8)
        "prefetch": "auto",  # batches each worker prepares ahead: auto = max(2, ceil(4 / workers))
        "shuffle_shards": 8,  # streamed tar shards: shards whose samples are shuffled together
    },
    "train": {
        "steps": 1000,
        "epochs": None,
        "images": None,
        "batch_size": 256,
        "seed": 0,
        "precision": "auto",
        "compile": False,
        "log_every": 10,
        "checkpoint_every": 500,
        "keep_every": 0,
        "nonfinite": "skip",
        "max_nonfinite": 20,
        "progress": True,
        "tensorboard": True,
    },
    "optim": {
        "lr": 5e-4,
        "lr_batch_reference": 256,
        "min_lr": 1e-6,
        "warmup_epochs": 0.0,
        "weight_decay": 0.04,
        "weight_decay_end": None,
        "betas": [0.9, 0.999],
        "clip_grad": 3.0,
        "freeze_last_layer_epochs": 0.0,
        "layer_decay": 1.0,
    },
    "ema": {"momentum": 0.996, "momentum_end": 1.0},
    "eval": {
        "knn_every": 0,
        "knn_train": None,
        "knn_test": None,
        "knn_k": 20,
        "knn_temperature": 0.07,
        "encoder": "auto",
        "pool": "cls",
        "image_size": None,
        "batch_size": 256,
    },
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def valid_keys(config: dict[str, Any]) -> list[str]:
    """All dotted keys of ``config``, sorted."""
    return sorted(flatten(config))


def _unknown_key_error(key: str, config: dict[str, Any], where: str) -> ConfigError:
    keys = valid_keys(config)
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(keys)}")


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (numbers, booleans, null, lists), else keep the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_key(config: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set the dotted ``key`` in ``config``; the key must already exist (strict)."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            raise _unknown_key_error(key, config, where)
        node = child
    if not isinstance(node, dict) or parts[-1] not in node or isinstance(node[parts[-1]], dict):
        raise _unknown_key_error(key, config, where)
    node[parts[-1]] = value


def merge_tree(config: dict[str, Any], update: dict[str, Any], where: str) -> None:
    """Merge a nested ``update`` into ``config`` strictly (every key must exist)."""
    for key, value in flatten(update).items():
        set_key(config, key, value, where)


def method_defaults(method_name: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The method's ``method.*`` defaults and the names of its data streams."""
    from wildssl.methods import get_method_class

    cls = get_method_class(method_name)
    return copy.deepcopy(cls.defaults), tuple(cls.streams)


def stream_keys(streams: tuple[str, ...]) -> dict[str, Any]:
    """``data.<stream>`` (a data SPEC) for every stream; ``data.<stream>_batch_size`` for the streams
    after the first (the first stream's batch is ``train.batch_size``; null lets the method derive it)."""
    keys: dict[str, Any] = {}
    for index, name in enumerate(streams):
        keys[name] = None
        if index:
            keys[f"{name}_batch_size"] = None
    return keys


def recipe_names() -> list[str]:
    """Names of the recipes shipped inside the package (``wildssl/recipes/*.yaml``)."""
    folder = resources.files("wildssl") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_recipe(recipe: str) -> tuple[dict[str, Any], str]:
    """Read a recipe by shipped name or YAML path; returns (tree, where-it-came-from)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {recipe} (give a YAML path or one of: "
                              f"{', '.join(recipe_names())})")
        text, where = path.read_text(), str(path)
    else:
        shipped = resources.files("wildssl") / "recipes" / f"{recipe}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"unknown recipe {recipe!r}; shipped recipes: {', '.join(recipe_names())} "
                              "(or give a path to a YAML file)")
        text, where = shipped.read_text(), f"recipe {recipe}"
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must hold a mapping of config sections, got {type(tree).__name__}")
    return tree, where


def build_config(recipe: str | dict[str, Any] | None = None, overrides: list[str] | None = None) -> dict:
    """Resolve defaults + method defaults + recipe + ``key=value`` overrides into one config.

    The method is chosen by ``method.name`` from the overrides, else the recipe, else the default.
    """
    if isinstance(recipe, dict):
        tree, where = copy.deepcopy(recipe), "config"
    elif recipe is None:
        tree, where = {}, "defaults"
    else:
        tree, where = read_recipe(recipe)
    pairs: list[tuple[str, Any]] = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (for example --set train.steps=100)")
        key, text = item.split("=", 1)
        pairs.append((key.strip(), parse_value(text)))

    method_name = (tree.get("method") or {}).get("name", DEFAULTS["method"]["name"])
    for key, value in pairs:
        if key == "method.name":
            method_name = value
    config = copy.deepcopy(DEFAULTS)
    defaults, streams = method_defaults(method_name)
    config["method"] = {"name": method_name, **defaults}
    config["data"] = {**stream_keys(streams), **config["data"]}
    merge_tree(config, tree, where)
    for key, value in pairs:
        set_key(config, key, value, "--set")
    config["method"]["name"] = method_name
    validate(config)
    return config


_CHOICES = {
    "train.precision": ("auto", "fp32", "bf16"),
    "train.nonfinite": ("skip", "stop"),
    "eval.encoder": ("auto", "teacher", "student"),
    "eval.pool": ("cls", "avg"),
}


def validate(config: dict[str, Any]) -> None:
    """Check value types and ranges that would otherwise fail deep inside training."""
    flat = flatten(config)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}={flat[key]!r} is not one of {', '.join(map(str, choices))}")
    for key in ("train.steps", "train.batch_size", "data.load_size", "data.max_pixels", "model.patch_size"):
        if not isinstance(flat[key], int) or flat[key] <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {flat[key]!r}")
    if flat["train.epochs"] is not None and not (isinstance(flat["train.epochs"], (int, float))
                                                 and flat["train.epochs"] > 0):
        raise ConfigError(f"train.epochs must be a positive number or null, got {flat['train.epochs']!r}")
    resolve_num_workers(flat["data.num_workers"], cores=1)  # ConfigError on anything but auto / an int >= 0
    resolve_prefetch(flat["data.prefetch"], 1)
    if isinstance(flat["data.shuffle_shards"], bool) or not isinstance(flat["data.shuffle_shards"], int) \
            or flat["data.shuffle_shards"] < 1:
        raise ConfigError(f"data.shuffle_shards must be a positive number of shards, got {flat['data.shuffle_shards']!r}")
    if not isinstance(flat["optim.lr"], (int, float)) or flat["optim.lr"] < 0:
        raise ConfigError(f"optim.lr must be a non-negative number, got {flat['optim.lr']!r}")


def dump_config(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
