"""Export the encoder as a timm ``VisionTransformer`` state dict plus the ``create_model`` kwargs it needs.

Usage on a machine with timm::

    model = timm.create_model("vit_small_patch16_224", pretrained=False, **timm_kwargs(encoder))
    model.load_state_dict(timm_state_dict(encoder))  # strict

The kwargs pin every architectural choice, so any plain ``vit_*`` model name works as the base. timm's
``dynamic_img_size`` resizes ``pos_embed`` bicubically like wildssl, but with antialiasing on, so features
of crops *smaller* than ``img_size`` differ slightly between the two; at ``img_size`` and above they agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from wildssl.errors import CheckpointError
from wildssl.io import atomic_save, read_header
from wildssl.models.loading import (CHECKPOINT_FORMAT, EXPORT_FORMAT, checkpoint_model_config, evaluated_pool,
                                    load_encoder, resolve_checkpoint)
from wildssl.models.vit import VisionTransformer

WILDSSL_ONLY_KEYS = ("mask_token",)


def _unwrap(model: nn.Module) -> VisionTransformer:
    # DDP/FSDP wrappers keep the model in `.module`, torch.compile in `._orig_mod`.
    while not isinstance(model, VisionTransformer):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a wildssl VisionTransformer, got {type(model).__name__}")
        model = inner
    return model


def timm_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state dict under timm's names: wildssl-only keys dropped, contiguous CPU tensors."""
    state = _unwrap(encoder).state_dict()
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()
            if name not in WILDSSL_ONLY_KEYS}


def timm_kwargs(encoder: nn.Module, pool: str | None = None) -> dict:
    """Keyword arguments of ``timm.create_model`` that rebuild this encoder's architecture (JSON-safe);
    ``pool``: the feature the run evaluates (``cls`` / ``avg``; default the class token where there is one)."""
    vit = _unwrap(encoder)
    return {
        "img_size": vit.img_size,
        "patch_size": vit.patch_size,
        "in_chans": vit.in_chans,
        "embed_dim": vit.embed_dim,
        "depth": vit.depth,
        "num_heads": vit.num_heads,
        "mlp_ratio": vit.mlp_ratio,
        "qkv_bias": True,
        "init_values": None,  # no LayerScale; explicit because timm's DINOv2 presets set one
        "class_token": vit.class_token,
        "reg_tokens": vit.num_register_tokens,
        "no_embed_class": True,  # pos_embed covers the patches only (see wildssl.models.vit)
        "pre_norm": False,
        "fc_norm": False,
        "global_pool": "token" if vit.class_token and pool != "avg" else "avg",
        "dynamic_img_size": True,
        "num_classes": 0,
    }


def save_encoder_export(path: Path, checkpoint: str | Path, teacher: bool | None = None,
                        timm: bool = False) -> dict:
    """Write the encoder alone. ``timm=True`` drops wildssl-only keys (``mask_token``) so the file is a
    state dict timm's VisionTransformer loads with the kwargs stored in the metadata (``timm_kwargs``)."""
    path, source = Path(path), resolve_checkpoint(checkpoint)
    check_export_target(path, source)
    model_config = checkpoint_model_config(checkpoint, teacher)
    encoder = load_encoder(checkpoint, teacher)  # as every evaluation reads it (a timm export has no mask token)
    tensors = timm_state_dict(encoder) if timm else dict(encoder.state_dict())
    metadata = export_metadata(encoder, model_config, evaluated_pool(source))
    atomic_save(tensors, metadata, path)
    return json.loads(metadata["timm_kwargs"])


def export_metadata(encoder: nn.Module, model_config: dict, pool: str | None) -> dict[str, str]:
    """The metadata of an export file: its format, its config (the model, and the run's ``eval.pool`` when known,
    so that ``eval knn EXPORT`` reads the feature ``eval knn RUN`` reads) and the timm kwargs (pooling to match)."""
    config = {"model": model_config, **({"eval": {"pool": pool}} if pool is not None else {})}
    return {"format": EXPORT_FORMAT, "config": json.dumps(config),
            "timm_kwargs": json.dumps(timm_kwargs(encoder, pool))}


def check_export_target(path: Path, source: Path) -> None:
    """A CheckpointError when writing an export to ``path`` would destroy something: the file it is read from,
    a run's training checkpoint (its optimizer, heads and teacher; the export holds one encoder), or a folder."""
    if path.is_dir():
        raise CheckpointError(f"--out {path} is a folder; give a file name, e.g. {path / 'encoder.safetensors'}")
    if not path.is_file():
        return
    if path.resolve() == source.resolve():
        raise CheckpointError(f"--out {path} is the checkpoint being exported; writing the encoder over it would "
                              "lose the rest of the run: choose another --out")
    try:
        fmt = read_header(path)[0].get("format")
    except CheckpointError:  # not a safetensors file: an ordinary file the user names, replaced as asked
        return
    if fmt == CHECKPOINT_FORMAT:
        raise CheckpointError(f"--out {path} is a training checkpoint; writing an export over it would lose that "
                              "run's optimizer, heads and teacher: choose another --out")
