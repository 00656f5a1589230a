"""Configuration: defaults + method defaults + recipe YAML + dotted command-line overrides.

A config is a nested ``dict`` whose keys are fixed by :data:`DEFAULTS` and by the chosen method's
``defaults``. Every key a recipe or ``--set`` names must exist there: a typo is a :class:`ConfigError`
that lists the valid keys, never a silently ignored option. Every value is then checked against its
type and sane range (:mod:`wildssl.schema`), so a wrong value fails here, in one line, and not deep
inside training. The resolved config is written beside every run (``config.yaml``) and inside every
checkpoint; ``wildssl config RECIPE`` prints it.

Recipe inheritance: a recipe's top-level ``inherit: NAME`` (a shipped recipe, or a YAML path, relative to
the inheriting file) starts from that recipe's tree and overrides it key by key (lists are replaced,
not merged), so ``ab_dino.yaml`` holds only what differs from ``dino.yaml``: the ``ab_*`` keys, the
streams and ``method.name``. When the two recipes' methods read different data streams, the parent's
first stream becomes the child's first stream (``data.train`` of a base method is the ``data.annotation``
of its annotation-bootstrapping variant); chains are followed, cycles are a ConfigError.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from wildssl.errors import ConfigError
from wildssl.schema import check_tree, load_yaml, rule_for

log = logging.getLogger("wildssl")

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
        # where JPEGs are decoded: cpu (the workers, Pillow), gpu (nvJPEG on the device, the workers only
        # read the files; needs torchvision and CUDA), auto (gpu where it can); data/gpu_decode.py
        "decode": "cpu",
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
        "sharding": "ddp",  # ddp: replicas; fsdp: FSDP2, a unit per block (train/fsdp.py; launch with torchrun)
        "activation_checkpointing": False,  # fsdp: recompute each student block's activations in the backward
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
        "pool": None,  # null: the method's own method.pool where it has one (what it trained on), else cls
        "image_size": None,
        "batch_size": 256,
        "online_probe": False,
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
    """Parse a ``--set`` value with YAML rules (numbers in any usual spelling, booleans, null, lists),
    else keep the string."""
    try:
        return load_yaml(text)
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


def _load_recipe(recipe: str, relative_to: Path | None = None) -> tuple[dict[str, Any], str]:
    """One recipe file's tree as written (``inherit`` not followed) and where it came from."""
    path = Path(recipe)
    if relative_to is not None and path.suffix in (".yaml", ".yml") and not path.is_absolute():
        path = relative_to / path
    # A shipped recipe's bare name is that recipe, whatever the current folder holds: a run folder named after
    # its recipe (--out mae_quick) hid it ("recipe file not found: mae_quick"). ./NAME reads a file of that name.
    shipped_name = recipe in recipe_names() and os.sep not in recipe and "/" not in recipe
    if not shipped_name and (path.suffix in (".yaml", ".yml") or path.exists()):
        if path.is_dir():
            raise ConfigError(f"recipe {path} is a folder, not a YAML file (give a YAML path or one of: "
                              f"{', '.join(recipe_names())})")
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path} (give a YAML path or one of: "
                              f"{', '.join(recipe_names())})")
        text, where = path.read_text(), str(path)
    else:
        shipped = resources.files("wildssl") / "recipes" / f"{recipe}.yaml"
        if not shipped.is_file():
            close = difflib.get_close_matches(recipe, recipe_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown recipe {recipe!r}{hint}; shipped recipes: {', '.join(recipe_names())} "
                              "(or give a path to a YAML file)")
        text, where = shipped.read_text(), f"recipe {recipe}"
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must hold a mapping of config sections, got {type(tree).__name__}")
    return tree, where


def default_config(method_name: str) -> dict[str, Any]:
    """:data:`DEFAULTS` with the method's ``method.*`` keys and its ``data.<stream>`` keys."""
    config = copy.deepcopy(DEFAULTS)
    defaults, streams = method_defaults(str(method_name))
    config["method"] = {"name": method_name, **defaults}
    config["data"] = {**stream_keys(streams), **config["data"]}
    return config
def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` overridden by ``update`` key by key (nested mappings merged, everything else replaced)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _method_name(tree: dict[str, Any]) -> str:
    return (tree.get("method") or {}).get("name", DEFAULTS["method"]["name"])


def inherit_recipe(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The tree of a recipe that inherits ``parent``: the parent's first data stream renamed to the child
    method's first stream when the two methods' streams differ, then ``child`` merged over it."""
    _, parent_streams = method_defaults(_method_name(parent))
    _, child_streams = method_defaults(_method_name(_merged(parent, child)))
    parent = copy.deepcopy(parent)
    data = parent.get("data") or {}
    if parent_streams != child_streams and parent_streams[0] in data and parent_streams[0] not in child_streams:
        data[child_streams[0]] = data.pop(parent_streams[0])
    return _merged(parent, child)


def read_recipe(recipe: str, _seen: tuple[str, ...] = (),
                _relative_to: Path | None = None) -> tuple[dict[str, Any], str]:
    """Read a recipe by shipped name or YAML path, following ``inherit`` (see the module docstring);
    returns (tree, where-it-came-from)."""
    tree, where = _load_recipe(recipe, _relative_to)
    parent = tree.pop("inherit", None)
    if parent is None:
        return tree, where
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{where}: inherit must name one recipe (e.g. inherit: dino), got {parent!r}")
    if where in _seen:
        raise ConfigError(f"recipe inheritance loops: {' -> '.join(_seen + (where,))}; a recipe cannot inherit itself")
    folder = Path(where).parent if Path(where).is_file() else None
    parent_tree, _ = read_recipe(parent, _seen + (where,), folder)
    return inherit_recipe(parent_tree, tree), where


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, str]]:
    """``--set`` items ``key=value`` -> ``(key, value text)`` pairs (the key stripped, the text as typed)."""
    pairs: list[tuple[str, str]] = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (for example --set train.steps=100)")
        key, text = item.split("=", 1)
        pairs.append((key.strip(), text))
    return pairs


def _warn_shadowed_steps(config: dict, overridden: set[str]) -> None:
    """A warning when ``--set train.steps=N`` cannot decide the run's length: ``train.images``, else
    ``train.epochs``, does (the recipe sets one), so the run would last that long instead."""
    train = config["train"]
    decides = next((key for key in ("images", "epochs") if train[key] is not None), None)
    if "train.steps" in overridden and decides and f"train.{decides}" not in overridden:
        log.warning("train.steps=%s is not the run's length: the recipe's train.%s=%g decides it; add --set "
                    "train.%s=null to run %s steps", train["steps"], decides, train[decides], decides, train["steps"])


def build_config(recipe: str | dict[str, Any] | None = None, overrides: list[str] | None = None) -> dict:
    """Resolve defaults + method defaults + recipe + ``key=value`` overrides into one checked config.

    The method is chosen by ``method.name`` from the overrides, else the recipe, else the default.
    """
    if isinstance(recipe, dict):
        tree, where = copy.deepcopy(recipe), "config"
    elif recipe is None:
        tree, where = {}, "defaults"
    else:
        tree, where = read_recipe(recipe)
    pairs = parse_overrides(overrides)

    method_section = tree.get("method")
    method_name = (method_section.get("name", DEFAULTS["method"]["name"]) if isinstance(method_section, dict)
                   else DEFAULTS["method"]["name"])
    named = isinstance(method_section, dict) and "name" in method_section
    for key, text in pairs:
        if key == "method.name":
            method_name, named = text.strip(), True
    if isinstance(recipe, (str, Path)) and not named:  # an empty or half-written file ran SimCLR at ViT-S/224
        raise ConfigError(f"{where} names no method: give it method: {{name: ...}} (or inherit: RECIPE), or --set "
                          f"method.name=...; `wildssl recipes` lists the shipped recipes")
    config = default_config(method_name)
    defaults = flatten(config)
    if isinstance(method_section, dict) and method_section.get("name", method_name) != method_name:
        # --set method.name=X over a recipe of another method: the recipe's method.* keys are that method's
        foreign = sorted(set(method_section) - set(config["method"]))
        if foreign:
            raise ConfigError(f"--set method.name={method_name} on {where} (method {method_section['name']}): its key "
                              f"method.{foreign[0]} is {method_section['name']}'s, not {method_name}'s; start from a "
                              f"{method_name} recipe instead (see `wildssl recipes`)")
    merge_tree(config, tree, where)
    for key, text in pairs:
        value = parse_value(text)
        if value is not None and not isinstance(value, str) and rule_for(key, defaults.get(key)).kind == "str":
            value = text.strip()  # a string key keeps what was typed: --data 2024 names the folder "2024"
        set_key(config, key, value, "--set")
    config["method"]["name"] = method_name
    validate(config)
    _warn_shadowed_steps(config, {key for key, _ in pairs})
    if config["eval"]["pool"] is None:  # the k-NN reads the feature the method trains
        config["eval"]["pool"] = method_pool(config)
    return config


def method_pool(config: dict[str, Any]) -> str:
    """The method's ``method.pool`` (checked: a misspelling is a ConfigError naming that key), or ``cls`` for a
    method that has none."""
    from wildssl.methods.base import check_pool

    return check_pool(config["method"]["pool"]) if "pool" in config["method"] else "cls"


def validate(config: dict[str, Any]) -> None:
    """Check every value's type and range (:mod:`wildssl.schema`) and store it in its canonical type
    (an integral ``1e3`` for an integer key becomes ``1000``); one-line ConfigError otherwise."""
    checked = check_tree(flatten(config), flatten(default_config(config["method"]["name"])))
    for key, value in checked.items():
        set_key(config, key, value, "config")
    patch = config["model"]["patch_size"]
    sides = {"eval.image_size": config["eval"]["image_size"]}
    sides.update({f"method.{key}": value for key, value in config["method"].items() if _is_view_side(key)})
    for key, size in sides.items():  # else the first step or online k-NN, after the run has started, says it
        if isinstance(size, int) and size % patch:
            raise ConfigError(f"{key}={size} is not a multiple of model.patch_size={patch}: the encoder cuts images "
                              f"into {patch}-px patches; give {size // patch * patch or patch} or "
                              f"{(size // patch + 1) * patch}")


def _is_view_side(key: str) -> bool:
    """A method key that sets the side in pixels of views the encoder reads (crops, DINO's global and local crops)."""
    return key in ("crop_size", "global_size", "local_size") or key.endswith("_crop_size")


def dump_config(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
