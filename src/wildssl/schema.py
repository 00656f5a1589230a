"""The type and sane range of every config value, checked when a config is built.

Each dotted key gets a :class:`Rule`: its kind (integer, number, flag, text, choice, pair of numbers),
its bounds and whether null is allowed. Where the rule comes from:

1. :data:`CORE_RULES`, written out for the keys shared by every method (``train.*``, ``optim.*``, ...);
2. otherwise it is derived from the key's default value (a method's ``defaults``, or a core default
   without an explicit rule): ``True`` -> a flag, ``3`` -> an integer, ``0.1`` -> a number, ``"bpe"`` ->
   text, ``[0.08, 1.0]`` -> a list of that many numbers, ``None`` -> null or anything;
3. the range of a derived rule, and the kind of a null default, come from the key's last name by
   convention (:data:`NAME_RULES`): temperatures are > 0, momentums and probabilities in [0, 1], crop
   scales pairs in (0, 1], sizes, widths and depths positive integers, and so on.

A check either returns the value in its canonical type (an integral ``1e3`` for an integer key becomes
``1000``, an integer for a number key becomes a float, a numeric string becomes a number) or raises a
one-line :class:`~wildssl.errors.ConfigError` naming the key, the value and what would be right. A bool
is never a number: ``train.steps=true`` is an error, not one step.

Numbers in YAML: YAML 1.1 (PyYAML) reads ``1e-4`` as the string "1e-4"; :class:`ConfigLoader` reads it,
``1E-4``, ``.5``, ``5.`` and ``1_000`` as numbers, as YAML 1.2 and every user do.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from wildssl.errors import ConfigError

# Longest run the per-iteration schedules are built for: each is a float64 array of total_steps values
# (see wildssl.train.optim), so 10^7 steps cost 80 MB per schedule; a typo such as train.steps=1e12 must
# not try to allocate terabytes.
MAX_STEPS = 10_000_000
# Largest side in pixels an image is decoded to or evaluated at: a 4096^2 RGB image is already 50 MB.
MAX_PIXELS_SIDE = 4096

_NUMBER = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-4``, ``1E-4`` and ``2e3`` are floats (YAML 1.2), not strings, and a key
    given twice in one mapping is an error (PyYAML keeps the last one without a word, so ``steps: 3`` above a
    forgotten ``steps: 4`` would train 4)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: the base class says what is wrong with it
                    continue
                if first is not None:  # by presence: two on one line ({steps: 3, steps: 4}) count too
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice, on lines {first} and {line}", key_node.start_mark)
                lines[key] = line
        return super().construct_mapping(node, deep)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _NUMBER, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML with :class:`ConfigLoader` (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader subclass: no arbitrary objects


@dataclass(frozen=True)
class Rule:
    """What a config value may be.

    ``kind``: ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"choice"`` (one of ``choices``; a number
    kind with ``choices`` also takes those words, e.g. ``auto``), ``"list"``
    (``length`` numbers of ``item`` kind ``"int"`` or ``"float"``, each within the bounds, ascending when
    ``ordered``) or ``"any"``. ``low``/``high`` bound numbers (open ends when ``low_open``/``high_open``).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    length: int | None = None
    item: str = "float"
    ordered: bool = False

    def describe(self) -> str:
        """What a right value looks like, in words: ``"an integer >= 1"``, ``"null or a number in (0, 1]"``."""
        if self.kind == "list":
            items = "integers" if self.item == "int" else "numbers"
            text = f"a list of {self.length} {items}{self._bounds()}"
            if self.ordered:
                text += ", the first <= the second"
        elif self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        else:
            text = {"int": "an integer", "float": "a finite number", "bool": "true or false",
                    "str": "a string", "any": "any value"}[self.kind] + self._bounds()
            if self.choices:  # words a number key also takes, such as auto
                text = " or ".join(self.choices) + " or " + text
        return f"null or {text}" if self.nullable and self.kind != "any" else text

    def _bounds(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {_num(self.high)}"
        return ""


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else repr(value)


def integer(low: int | None = None, high: int | None = None, nullable: bool = False) -> Rule:
    return Rule("int", low, high, nullable=nullable)


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           nullable: bool = False) -> Rule:
    return Rule("float", low, high, low_open, high_open, nullable=nullable)


def text(nullable: bool = False) -> Rule:
    return Rule("str", nullable=nullable)


def flag() -> Rule:
    return Rule("bool")


def one_of(*choices: str, nullable: bool = False) -> Rule:
    return Rule("choice", choices=choices, nullable=nullable)


def pair(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
         ordered: bool = True) -> Rule:
    return Rule("list", low, high, low_open, high_open, length=2, ordered=ordered)


POSITIVE = dict(low=0.0, low_open=True)
UNIT = dict(low=0.0, high=1.0)

# The keys every config has (train/config.py DEFAULTS), with their types and sane ranges.
CORE_RULES: dict[str, Rule] = {
    "method.name": text(),
    "model.name": text(),
    "model.patch_size": integer(1, 1024),
    "model.img_size": integer(1, MAX_PIXELS_SIDE),
    "model.num_register_tokens": integer(0, 1024),
    "model.drop_path_rate": number(0.0, 1.0, high_open=True),
    "model.depth": integer(1, 1024, nullable=True),
    "model.embed_dim": integer(1, 65536, nullable=True),
    "model.num_heads": integer(1, 1024, nullable=True),
    "model.init_from": text(nullable=True),
    "data.load_size": integer(1, MAX_PIXELS_SIDE),
    "data.num_workers": Rule("int", 0, 256, choices=("auto",)),  # auto: data/workers.py resolve_num_workers
    "data.prefetch": Rule("int", 1, 1024, choices=("auto",)),  # auto: data/workers.py resolve_prefetch
    "data.shuffle_shards": integer(1, 2**20),
    "data.max_pixels": integer(1, 2**40),
    "data.decode": one_of("cpu", "gpu", "auto"),  # data/gpu_decode.py resolve_decode
    "train.steps": integer(1, MAX_STEPS),
    "train.epochs": number(**POSITIVE, high=1e6, nullable=True),
    "train.images": integer(1, 10**15, nullable=True),
    "train.batch_size": integer(1, 2**20),
    "train.seed": integer(0, 2**32 - 1),
    "train.precision": one_of("auto", "fp32", "bf16"),
    "train.compile": flag(),
    "train.log_every": integer(1, MAX_STEPS),
    "train.checkpoint_every": integer(0, MAX_STEPS),
    "train.keep_every": integer(0, MAX_STEPS),
    "train.nonfinite": one_of("skip", "stop"),
    "train.max_nonfinite": integer(0, MAX_STEPS),
    "train.progress": flag(),
    "train.tensorboard": flag(),
    "train.sharding": one_of("ddp", "fsdp"),
    "train.activation_checkpointing": flag(),
    "optim.lr": number(**POSITIVE),
    "optim.lr_batch_reference": integer(1, 2**20, nullable=True),
    "optim.min_lr": number(0.0),
    "optim.warmup_epochs": number(0.0, 1e6),
    "optim.weight_decay": number(0.0),
    "optim.weight_decay_end": number(0.0, nullable=True),
    "optim.betas": pair(0.0, 1.0, high_open=True, ordered=False),
    "optim.clip_grad": number(0.0, nullable=True),
    "optim.freeze_last_layer_epochs": number(0.0, 1e6),
    "optim.layer_decay": number(0.0, 1.0, low_open=True),
    "ema.momentum": number(**UNIT),
    "ema.momentum_end": number(**UNIT),
    "eval.knn_every": integer(0, MAX_STEPS),
    "eval.knn_train": text(nullable=True),
    "eval.knn_test": text(nullable=True),
    "eval.knn_k": integer(1, 100_000),
    "eval.knn_temperature": number(**POSITIVE),
    "eval.encoder": one_of("auto", "teacher", "student"),
    "eval.pool": one_of("cls", "avg", nullable=True),  # null: method.pool (train/config.py)
    "eval.image_size": integer(1, MAX_PIXELS_SIDE, nullable=True),
    "eval.batch_size": integer(1, 2**20),
}


@dataclass(frozen=True)
class NameRule:
    """The range of a derived rule, chosen by the key's last name (``pattern``, fnmatch style) and the kind
    of its default (``applies_to``: ``"number"`` for int/float defaults, ``"list"``, or ``"null"``, where
    ``kind`` gives the type the null default stands for)."""

    pattern: str
    applies_to: tuple[str, ...]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    ordered: bool = False
    kind: str | None = None


_NUMBERS = ("number", "null")
# First match wins, so exact names come before the patterns they would also match.
NAME_RULES: tuple[NameRule, ...] = (
    NameRule("vocab_size", _NUMBERS, 1, 2**24, kind="int"),
    NameRule("context_length", _NUMBERS, 1, 65536, kind="int"),
    NameRule("ab_n_crops", _NUMBERS, 2, 64, kind="int"),  # ordered pairs of crops need two
    NameRule("ab_iou_range", ("list",), 0.0, 1.0, ordered=True),
    NameRule("ab_photometric", ("null",), kind="str"),
    NameRule("text_size", ("null",), kind="str"),  # a text tower's named size (models/text.py TEXT_SIZES)
    # a distribution over one prototype, slot class or label is always 1: its loss is 0 and nothing trains
    NameRule("out_dim", _NUMBERS, 2, 2**20, kind="int"),
    NameRule("patch_out_dim", _NUMBERS, 2, 2**20, kind="int"),
    NameRule("num_prototypes", _NUMBERS, 2, 2**20, kind="int"),
    NameRule("vocabulary_size", _NUMBERS, 2, 2**24, kind="int"),
    NameRule("*_aspect", ("list",), 0.0, low_open=True, ordered=True),  # aspect-ratio ranges (w / h)
    NameRule("*temp", _NUMBERS, 0.0, low_open=True, kind="float"),
    NameRule("*temperature", _NUMBERS, 0.0, low_open=True, kind="float"),
    NameRule("*_epochs", _NUMBERS, 0.0, 1e6, kind="float"),
    NameRule("*momentum", _NUMBERS, 0.0, 1.0, kind="float"),
    NameRule("*_prob", _NUMBERS, 0.0, 1.0, kind="float"),
    NameRule("*_scale", ("list",), 0.0, 1.0, low_open=True, ordered=True),  # crop scales (area fractions)
    NameRule("*_scale", _NUMBERS, 0.0, kind="float"),  # loss weights
    NameRule("*_weight", _NUMBERS, 0.0, kind="float"),  # loss weights
    NameRule("*_weight_end", _NUMBERS, 0.0, kind="float"),  # a loss weight at the last step
    NameRule("*_ratio", _NUMBERS, 0.0, kind="float"),
    NameRule("*_fraction", _NUMBERS, 0.0, 1.0, low_open=True, kind="float"),  # a share of the run or of a set
    NameRule("*_range", ("list",), ordered=True),
    NameRule("*crop_size", _NUMBERS, 1, MAX_PIXELS_SIDE, kind="int"),  # sides in pixels
    NameRule("global_size", _NUMBERS, 1, MAX_PIXELS_SIDE, kind="int"),
    NameRule("local_size", _NUMBERS, 1, MAX_PIXELS_SIDE, kind="int"),
    NameRule("*image_size", _NUMBERS, 1, MAX_PIXELS_SIDE, kind="int"),
    NameRule("*_size", _NUMBERS, 1, 2**31, kind="int"),
    NameRule("*_dim", _NUMBERS, 1, 2**20, kind="int"),
    NameRule("*_width", _NUMBERS, 1, 65536, kind="int"),
    NameRule("*_depth", _NUMBERS, 1, 1024, kind="int"),
    NameRule("*_layers", _NUMBERS, 1, 1024, kind="int"),
    NameRule("*_heads", _NUMBERS, 1, 1024, kind="int"),
    NameRule("*_bins", _NUMBERS, 1, 2**20, kind="int"),
    NameRule("*_pixels", _NUMBERS, 1, kind="int"),  # pixel counts (a cap on decoded image area)
    NameRule("n_*", _NUMBERS, 0, 2**20, kind="int"),
)


def _default_kind(default: Any) -> str:
    if default is None:
        return "null"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (int, float)):
        return "number"
    if isinstance(default, (list, tuple)):
        return "list"
    return "str"


def derived_rule(key: str, default: Any) -> Rule:
    """The rule of ``key`` derived from its ``default`` value and its name (see the module docstring)."""
    name = key.rsplit(".", 1)[-1]
    kind = _default_kind(default)
    matched = next((r for r in NAME_RULES if kind in r.applies_to and fnmatch.fnmatchcase(name, r.pattern)), None)
    bounds = {} if matched is None else dict(low=matched.low, high=matched.high, low_open=matched.low_open,
                                            high_open=matched.high_open)
    if kind == "null":
        if matched is None or matched.kind is None:
            return Rule("any", nullable=True)
        return Rule(matched.kind, nullable=True, **(bounds if matched.kind in ("int", "float") else {}))
    if kind == "bool":
        return flag()
    if kind == "str":
        return text()
    if kind == "number":
        number_kind = matched.kind if matched is not None and matched.kind else (
            "int" if isinstance(default, int) else "float")
        return Rule(number_kind, **bounds)
    if default and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in default):
        item = "int" if all(isinstance(v, int) for v in default) else "float"
        return Rule("list", length=len(default), item=item, ordered=bool(matched and matched.ordered), **bounds)
    return Rule("any")  # an empty list, or a list of something else: no method has one yet


def rule_for(key: str, default: Any) -> Rule:
    """The rule of the dotted ``key`` whose default value is ``default``."""
    if key in CORE_RULES:
        return CORE_RULES[key]
    section, _, name = key.partition(".")
    if section == "data" and default is None:  # the streams a method declares (train/config.py stream_keys)
        return integer(1, 2**20, nullable=True) if name.endswith("_batch_size") else text(nullable=True)
    return derived_rule(key, default)


def show(value: Any) -> str:
    """A value as the user would type it (``true``, ``null``, ``"abc"``, ``[0.5, 1.0]``)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_value(key: str, value: Any, rule: Rule) -> Any:
    """``value`` in the canonical type of ``rule``, or a one-line ConfigError naming ``key``."""
    if value is None:
        if rule.nullable:
            return None
        raise ConfigError(f"{key}=null is invalid: {key} must be {rule.describe()}")
    try:
        return _coerce(value, rule)
    except ValueError as reason:
        note = f" ({reason})" if str(reason) else ""
        raise ConfigError(f"{key}={show(value)} is invalid{note}: {key} must be {rule.describe()}") from None


def _coerce(value: Any, rule: Rule) -> Any:
    if rule.kind == "any" or (rule.kind != "choice" and value in rule.choices):
        return value
    if rule.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("")
        return value
    if rule.kind == "str":
        if not isinstance(value, str):
            raise ValueError("quote it to give a string" if isinstance(value, (int, float)) else "")
        return value
    if rule.kind == "choice":
        if value not in rule.choices:
            raise ValueError("")
        return value
    if rule.kind in ("int", "float"):
        return _bounded(_as_number(value, rule.kind), rule)
    if rule.kind == "list":
        if not isinstance(value, (list, tuple)) or len(value) != rule.length:
            raise ValueError("")
        items = [_bounded(_as_number(v, rule.item), rule) for v in value]
        if rule.ordered and any(a > b for a, b in zip(items, items[1:])):
            raise ValueError("the items are not in ascending order")
        return items
    raise AssertionError(f"unknown rule kind {rule.kind!r}")


def _as_number(value: Any, kind: str) -> int | float:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value.strip().replace("_", ""))  # a number given as text: a JSON or Python config
    if not isinstance(value, (int, float)):
        raise ValueError("")
    if not math.isfinite(value):
        raise ValueError("not finite")
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError("not a whole number")
            value = int(value)
        return value
    return float(value)


def _bounded(value: int | float, rule: Rule) -> int | float:
    if rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low)):
        raise ValueError("out of range")
    if rule.high is not None and (value > rule.high or (rule.high_open and value == rule.high)):
        raise ValueError("out of range")
    return value


def check_tree(flat: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Check every dotted key of ``flat`` against its rule (``defaults`` gives each key's default value);
    returns the values in their canonical types."""
    return {key: check_value(key, value, rule_for(key, defaults.get(key))) for key, value in flat.items()}
