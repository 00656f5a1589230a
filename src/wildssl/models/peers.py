"""Encoders trained elsewhere, from local files, loaded strictly into wildssl's ViT.

So that peers' weights are measured with the same evaluation suite. Layouts (no downloads: the user
gives the file):

- ``timm``: a timm ``VisionTransformer`` state dict (``.safetensors`` or ``.pth``), e.g. the hub's
  ``model.safetensors``. Its classifier ``head.*`` is dropped (a probe replaces it).
- ``dino``: the official DINO (Caron et al. 2021) backbone files (``dino_deitsmall16_pretrain.pth``:
  the timm names), or a training checkpoint's ``teacher`` / ``student`` dict (``module.`` and
  ``backbone.`` prefixes stripped, the DINO head dropped).
- ``mae``: the official MAE (He et al. 2022) files, ``{"model": state}``; the decoder
  (``decoder_*``, the decoder's ``mask_token``) is dropped.
- ``maws``: the released MAWS (Singh et al. 2023, facebookresearch/maws) files: the ViT checkpoints
  (``mae`` / ``maws`` types) are timm ``VisionTransformer`` state dicts (``num_classes=0``: no head); the
  ``maws_clip`` checkpoints hold the image tower under ``vision_encoder.`` beside ``vision_projection``,
  ``text_encoder.*`` (XLM-R) and ``logit_scale``, which are dropped. MAWS's ViTs are timm's with a cls
  token and a position table over it (``no_embed_class=False``): folded as below.
- ``ijepa``: the official I-JEPA (Assran et al. 2023) checkpoints, ``{"encoder", "target_encoder",
  "predictor", ...}``: the target encoder by default (the one I-JEPA evaluates), the context encoder
  with ``teacher=False``. I-JEPA's ViT has no cls token: it is built with ``class_token=False``.

How each maps onto wildssl's ViT (exactly; outputs agree at the checkpoint's resolution):

- Position embeddings that cover the prefix tokens (``pos_embed`` ``(1, 1 + N, D)``, timm's
  ``no_embed_class=False``, DINO, MAE) are split: the prefix rows are constant additions to the cls
  (and register) tokens, so they are added to those tokens, and the patch rows become ``pos_embed``.
- A ViT without qkv bias gets a zero bias (the same function).
- Anything wildssl's ViT does not compute (LayerScale ``ls1/ls2``, ``fc_norm``, ``norm_pre``, q/k norms)
  is a CheckpointError naming the key: such a checkpoint cannot be evaluated faithfully.

Architecture is read from the shapes; the number of heads is not in the weights, so it comes from the
standard width table (:data:`wildssl.models.vit.ENCODER_SIZES`) unless given. At other resolutions
wildssl resizes the patch table bicubically without antialiasing; DINO's own resizing differs slightly.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from wildssl.errors import CheckpointError, ConfigError
from wildssl.io import read_safetensors
from wildssl.models.loading import CHECKPOINT_FORMAT, EXPORT_FORMAT, load_encoder, load_state_strict
from wildssl.models.vit import ENCODER_SIZES, VisionTransformer

LAYOUTS = ("auto", "wildssl", "timm", "dino", "mae", "maws", "ijepa")
# Keys a layout holds beside the encoder, dropped on purpose (heads and decoders the probes replace).
DROPPED = {
    "timm": (r"^head\.",),
    "dino": (r"^head\.",),
    "mae": (r"^decoder_", r"^mask_token$", r"^head\."),
    "maws": (r"^head\.", r"^vision_projection$", r"^text_projection$", r"^text_encoder\.", r"^logit_scale$"),
    "ijepa": (),
}
MAWS_IMAGE_TOWER = "vision_encoder."
UNSUPPORTED = (r"\.ls[12]\.", r"^fc_norm\.", r"^norm_pre\.", r"\.q_norm\.", r"\.k_norm\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def is_wildssl_file(path: Path) -> bool:
    """A run directory, or a safetensors file written by wildssl (checkpoint or export): its ``format``, or a
    ``config`` in its metadata (a wildssl file whose format entry was damaged goes to the wildssl loader, which
    names what is wrong; peers' safetensors carry no config)."""
    if path.is_dir():
        return True
    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return metadata.get("format") in (CHECKPOINT_FORMAT, EXPORT_FORMAT) or "config" in metadata
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None


def read_peer_file(path: Path) -> dict:
    """The top-level dict of a peer's file: safetensors (tensors) or a PyTorch file read with
    ``torch.load(weights_only=True)`` (never arbitrary pickles)."""
    if path.is_dir():
        kind = "a wildssl run directory" if (path / "config.yaml").is_file() else "a folder"
        raise CheckpointError(f"{path} is {kind}; a peer's layout (--layout) reads one checkpoint file (give the "
                              "file, or --layout auto for a wildssl run)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols printed as raw two-line warnings
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or OSError for what it refuses
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {first} (a training "
                              "checkpoint that pickles Python objects, such as argparse args, cannot be loaded "
                              "safely; save its encoder state dict alone, e.g. torch.save(ckpt['teacher'], ...))"
                              ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict")
    return raw


def detect_layout(raw: dict) -> str:
    """The layout of a peer's top-level dict (see the module docstring)."""
    keys = set(raw)
    if any(k.startswith(MAWS_IMAGE_TOWER) for k in keys):
        return "maws"
    if {"target_encoder", "encoder"} & keys and "predictor" in keys:
        return "ijepa"
    if {"teacher", "student"} & keys:
        return "dino"
    if "model" in keys and isinstance(raw["model"], dict):
        return "mae"
    names = {_strip(k) for k in keys}
    if "pos_embed" in names and "cls_token" not in names:
        return "ijepa"
    if "cls_token" in names:
        return "timm"
    raise CheckpointError(f"cannot tell the layout of this checkpoint (top-level keys e.g. {sorted(keys)[:4]}); "
                          f"pass the layout: one of {', '.join(LAYOUTS[2:])}")


def _strip(key: str) -> str:
    for prefix in ("module.", "backbone."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def encoder_tensors(raw: dict, layout: str, teacher: bool | None) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a peer's top-level dict, prefixes stripped, dropped keys removed."""
    if layout == "ijepa" and ("target_encoder" in raw or "encoder" in raw):
        name = "encoder" if teacher is False else "target_encoder"
        if name not in raw:
            raise CheckpointError(f"this I-JEPA checkpoint has no {name!r}; it holds {sorted(raw)}")
        raw = raw[name]
    elif layout == "dino" and ({"teacher", "student"} & set(raw)):
        name = "student" if teacher is False else "teacher"
        if name not in raw:
            raise CheckpointError(f"this DINO checkpoint has no {name!r}; it holds {sorted(raw)}")
        raw = raw[name]
    elif layout == "mae" and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    elif layout == "maws" and any(k.startswith(MAWS_IMAGE_TOWER) for k in raw):
        # a maws_clip checkpoint: the image tower's keys without their prefix; the text side is dropped below
        raw = {(k[len(MAWS_IMAGE_TOWER):] if k.startswith(MAWS_IMAGE_TOWER) else k): v for k, v in raw.items()}
    state = {}
    for key, value in raw.items():
        if not torch.is_tensor(value):
            raise CheckpointError(f"{layout} checkpoint entry {key!r} is a {type(value).__name__}, not a tensor "
                                  f"(is the layout right? one of {', '.join(LAYOUTS[2:])})")
        name = _strip(key)
        if any(re.search(pattern, name) for pattern in DROPPED[layout]):
            continue
        for pattern in UNSUPPORTED:
            if re.search(pattern, name):
                raise CheckpointError(f"{layout} checkpoint key {key!r} is a part wildssl's ViT does not have "
                                      "(LayerScale, fc_norm, norm_pre or q/k norms); it cannot be evaluated "
                                      "faithfully")
        state[name] = value.float()
    return state


def infer_architecture(state: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """``VisionTransformer`` keyword arguments from the tensors' shapes."""
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in state:
            raise CheckpointError(f"the checkpoint has no {key!r}; it is not a ViT encoder (keys e.g. "
                                  f"{sorted(state)[:4]})")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    class_token = "cls_token" in state
    rows = state["pos_embed"].shape[1]
    prefix = int(class_token) + registers
    patches = next((rows - extra for extra in (0, prefix) if _is_square(rows - extra)), None)
    if patches is None:
        raise CheckpointError(f"pos_embed has {rows} rows: neither a square grid of patches nor one plus "
                              f"{prefix} prefix tokens")
    if num_heads is None:
        heads = {size[0]: size[2] for size in ENCODER_SIZES.values()}
        if width not in heads:
            raise ConfigError(f"the checkpoint's width {width} is not a standard ViT width; give the number of "
                              "heads (--num-heads)")
        num_heads = heads[width]
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * width
    return {"img_size": math.isqrt(patches) * patch, "patch_size": patch, "embed_dim": width, "depth": depth,
            "num_heads": num_heads, "mlp_ratio": hidden / width, "num_register_tokens": registers,
            "class_token": class_token}


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def to_wildssl_state(state: dict[str, torch.Tensor], architecture: dict) -> dict[str, torch.Tensor]:
    """Fold prefix position embeddings into the prefix tokens and give bias-free qkv a zero bias."""
    state = dict(state)
    patches = (architecture["img_size"] // architecture["patch_size"]) ** 2
    table = state["pos_embed"]
    extra = table.shape[1] - patches
    if extra:
        prefix, state["pos_embed"] = table[:, :extra], table[:, extra:]
        state["cls_token"] = state["cls_token"] + prefix[:, :1]
        if architecture["num_register_tokens"]:
            state["reg_token"] = state["reg_token"] + prefix[:, 1:]
    for block in range(architecture["depth"]):
        key = f"blocks.{block}.attn.qkv.bias"
        if key not in state and f"blocks.{block}.attn.qkv.weight" in state:
            state[key] = torch.zeros(state[f"blocks.{block}.attn.qkv.weight"].shape[0])
    return state


def vit_architecture(encoder: VisionTransformer) -> dict:
    """The :class:`VisionTransformer` keyword arguments that rebuild ``encoder``'s architecture."""
    return {"img_size": encoder.img_size, "patch_size": encoder.patch_size, "embed_dim": encoder.embed_dim,
            "depth": encoder.depth, "num_heads": encoder.num_heads, "mlp_ratio": encoder.mlp_ratio,
            "num_register_tokens": encoder.num_register_tokens, "in_chans": encoder.in_chans,
            "class_token": encoder.class_token}


def random_like(encoder: VisionTransformer) -> VisionTransformer:
    """A new encoder of ``encoder``'s architecture at its initialization (drawn from the global RNG; seed
    it first), in eval mode: the floor every evaluation is compared with."""
    return VisionTransformer(**vit_architecture(encoder)).eval()


def load_peer_encoder(path: str | Path, layout: str = "auto", teacher: bool | None = None,
                      num_heads: int | None = None) -> tuple[VisionTransformer, str]:
    """A peer's encoder from a local file as a wildssl :class:`VisionTransformer` in eval mode, loaded
    strictly (every tensor used, every parameter filled; the mask token, which peers lack, stays zero),
    and the layout it was read as."""
    path = Path(path)
    if layout not in LAYOUTS or layout == "wildssl":
        raise ConfigError(f"unknown peer checkpoint layout {layout!r}; use one of {', '.join(LAYOUTS[2:])} or auto")
    raw = read_peer_file(path)
    layout = detect_layout(raw) if layout == "auto" else layout
    state = encoder_tensors(raw, layout, teacher)
    architecture = infer_architecture(state, num_heads)
    encoder = VisionTransformer(**architecture)
    state = to_wildssl_state(state, architecture)
    state.setdefault("mask_token", torch.zeros_like(encoder.mask_token))
    load_state_strict(encoder, state, f"{path} ({layout} layout)")
    return encoder.eval(), layout


def load_any_encoder(path: str | Path, layout: str = "auto", teacher: bool | None = None,
                     num_heads: int | None = None) -> tuple[VisionTransformer, str]:
    """An encoder to evaluate and what it is (``"wildssl"`` or the peer layout): a wildssl run directory,
    checkpoint or export (:func:`wildssl.models.loading.load_encoder`), or a peer's file."""
    path = Path(path)
    if reads_as_wildssl(path, layout):
        return load_encoder(path, teacher=teacher), "wildssl"
    return load_peer_encoder(path, layout, teacher, num_heads)


def reads_as_wildssl(path: Path, layout: str = "auto") -> bool:
    """Whether ``path`` given with ``--layout layout`` is read as a wildssl run, checkpoint or export (else as a
    peer's file, :func:`load_peer_encoder`)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown checkpoint layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return layout == "wildssl" or (layout == "auto" and path.exists() and is_wildssl_file(path))
