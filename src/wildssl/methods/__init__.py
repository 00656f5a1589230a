"""Training methods and their registry. Each method lives in its own file, named after it."""

from __future__ import annotations

import importlib

from wildssl.errors import ConfigError, WildsslError

# name -> "module:Class"; imported lazily so that listing methods costs nothing.
METHODS = {
    "simclr": "wildssl.methods.simclr:SimCLR",
    "dino": "wildssl.methods.dino:DINO",
    "clip": "wildssl.methods.clip:CLIP",
    "slip": "wildssl.methods.slip:SLIP",
    "silc": "wildssl.methods.silc:SiLC",
    "ibot": "wildssl.methods.ibot:IBOT",
    "slotmim": "wildssl.methods.slotmim:SlotMIM",
    "ab_simclr": "wildssl.methods.ab:ABSimCLR",
    "ab_dino": "wildssl.methods.ab:ABDINO",
    "ab_clip": "wildssl.methods.ab:ABCLIP",
    "mae": "wildssl.methods.mae:MAE",
    "wsp": "wildssl.methods.wsp:WSP",
    "lit": "wildssl.methods.lit:LiT",
    "ijepa": "wildssl.methods.ijepa:IJEPA",
    "simsiam": "wildssl.methods.simsiam:SimSiam",
    "adasim_dino": "wildssl.methods.adasim:AdaSimDINO",
    "adasim_simsiam": "wildssl.methods.adasim:AdaSimSimSiam",
    "nn_dino": "wildssl.methods.adasim:NNDINO",
    "nn_simsiam": "wildssl.methods.adasim:NNSimSiam",
    "oracle_dino": "wildssl.methods.adasim:OracleDINO",
    "oracle_simsiam": "wildssl.methods.adasim:OracleSimSiam",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method_class(name: str):
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (method.name); available: {', '.join(method_names())}")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_method(config: dict, load_init_from: bool = True):
    """Instantiate the method named by ``config['method']['name']``, its encoder initialized from
    ``model.init_from`` when that is set (``load_init_from=False``: not read, for a method built for its shapes
    before that file exists)."""
    method = get_method_class(config["method"]["name"])(config)
    if load_init_from and config["model"].get("init_from"):
        try:
            method.init_encoder_from(config["model"]["init_from"])
        except WildsslError as error:  # "checkpoint not found: X" said nothing of which key named X
            if str(error).startswith("model.init_from"):
                raise
            raise type(error)(f"model.init_from: {error}") from None
    return method


def build_initial_method(config: dict, load_init_from: bool = True):
    """The method exactly as a run of ``config`` starts: the global RNG seeded with ``train.seed``, then
    :func:`build_method`. The engine builds its method with this call, so the random-init floor of a run
    (``benchmarks/knn_folds.py``, the benchmark suites' floor, the tests' floors) is rebuilt with the same one."""
    import torch

    torch.manual_seed(config["train"]["seed"])
    return build_method(config, load_init_from)


def build_meta_method(config: dict):
    """The method on the meta device: shapes only, no weights, ``model.init_from`` not read (it may not exist yet),
    and every check its constructor makes (I-JEPA's ViT-B took 16 s to build with its weights, 0.05 s here).
    ``wildssl config`` and ``train`` refuse a bad value with it before any data is opened, and the benchmark suites
    read each entry's networks with it before any training."""
    import torch

    with torch.device("meta"):
        return build_method(config, load_init_from=False)
