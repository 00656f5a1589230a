"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for encoders too large for one device's memory (MAWS's
ViT-2B and ViT-6.5B): parameters, gradients and optimizer state sharded over the ranks, checkpoints through
``torch.distributed.checkpoint`` (DCP). Launched by ``torchrun`` like every wildssl run, on one node or many.

What it does to a method (:func:`shard_method`):

- every transformer block of every student and teacher network (``module.blocks``: the ViT, the text
  tower, decoders) is its own FSDP unit, so only one block's full weights exist at a time; the rest of the
  method (embeddings, heads, norms, logit scale) is the root unit;
- with ``activation_checkpointing``, each student block recomputes its activations in the backward pass
  (``torch.distributed._composable.checkpoint``) instead of keeping them;
- precision ``bf16``: parameters gathered and computed in bfloat16, gradients reduced in float32
  (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); ``fp32``: everything in float32 (MAWS
  trained ViT-6.5B in full precision for stability).

Checkpoints: :func:`save_sharded` writes one DCP directory (each rank its shards, plus metadata) with the
method, the optimizer and the step; :func:`load_sharded` restores them exactly (on any number of ranks: DCP
reshards); :func:`export_consolidated` turns a DCP directory into one wildssl encoder export file (no
process group needed), which every wildssl evaluation reads.

In a run (``train.sharding: fsdp``, :func:`shard_for_training`): the engine shards the method instead of
wrapping it in DDP, and writes ``checkpoint.dcp/`` (the DCP directory plus ``wildssl.json``: step, config,
counters) instead of ``checkpoint.safetensors``; ``--resume`` reads it back; ``wildssl export --checkpoint
RUN`` consolidates it into one encoder file for evaluation. The online k-NN and probe (which call the encoder
outside the sharded forward) and ``train.compile`` are not supported with it (a ConfigError says so).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from wildssl import distributed as dist
from wildssl.errors import CheckpointError, ConfigError
from wildssl.io import atomic_save
from wildssl.models.export import export_metadata
from wildssl.models.loading import (POOLS, RUN_STATE, SHARDED_CHECKPOINT,  # noqa: F401 (named here too)
                                    build_encoder_from_config, load_state_strict)
from wildssl.train.checkpoint import run_eval_network

PRECISIONS = ("bf16", "fp32")

# torch.distributed's checkpoint and FSDP modules are imported where they are used: at module level they took about
# 2 s of every `wildssl` command's start-up (half of it), though only train.sharding=fsdp runs need them.
if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy


def _checkpoint_activations(module: nn.Module) -> None:
    from torch.distributed._composable import checkpoint

    checkpoint(module)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """The FSDP2 policy of ``train.precision`` (module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in PRECISIONS:
        raise ConfigError(f"FSDP precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_method(method: nn.Module, precision: str = "bf16", activation_checkpointing: bool = True,
                 device_type: str | None = None) -> nn.Module:
    """Shard ``method`` in place over all ranks of the default process group: one FSDP unit per block, the
    rest as the root unit. Call after the method is built and initialized (``model.init_from``) and before
    the optimizer is made: its parameters become DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = torch.distributed.get_world_size()
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (world,))
    policy = mixed_precision(precision)
    for networks in (method.student, getattr(method, "teacher", None)):
        if networks is None:
            continue
        for module in networks.values():
            for block in getattr(module, "blocks", ()):
                if activation_checkpointing and networks is method.student:
                    _checkpoint_activations(block)
                fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(method, mesh=mesh, mp_policy=policy)
    return method


def save_sharded(directory: str | Path, method: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write the method, optimizer and step as one DCP checkpoint directory (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"method": get_model_state_dict(method), "optimizer": get_optimizer_state_dict(method, optimizer),
             "step": torch.tensor(step)}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(directory: str | Path, method: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore a :func:`save_sharded` directory into a sharded method and its optimizer; returns the step."""
    if not (Path(directory) / ".metadata").is_file():
        raise CheckpointError(f"{directory} is not a sharded (DCP) checkpoint: it has no .metadata file")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"method": get_model_state_dict(method), "optimizer": get_optimizer_state_dict(method, optimizer),
             "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(method, state["method"])
    set_optimizer_state_dict(method, optimizer, state["optimizer"])
    return int(state["step"])


def full_state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The whole method's state dict, gathered on every rank, on the CPU (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_consolidated(directory: str | Path, path: str | Path, model_config: dict, network: str = "student",
                        pool: str | None = None) -> None:
    """One wildssl encoder export file (``wildssl export``'s format) from a DCP checkpoint directory: the
    ``network``'s backbone, strictly checked against the encoder ``model_config`` declares; ``pool``: the run's
    ``eval.pool``, kept in the export as :func:`wildssl.models.export.save_encoder_export` keeps it. Runs in one
    process, without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        consolidated = Path(scratch) / "full.pt"
        try:
            dcp_to_torch_save(str(directory), str(consolidated))
        except Exception as error:  # DCP raises several types for a missing or foreign directory
            raise CheckpointError(f"cannot read the sharded checkpoint {directory}: {error}") from None
        state = torch.load(consolidated, map_location="cpu", weights_only=True)["method"]
    prefix = f"{network}.backbone."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    encoder = build_encoder_from_config(model_config)
    load_state_strict(encoder, encoder_state, str(directory))
    metadata = export_metadata(encoder, model_config, pool if pool in POOLS else None)
    atomic_save({k: v.contiguous() for k, v in encoder.state_dict().items()}, metadata, Path(path))


def shard_for_training(method: nn.Module, config: dict, device: torch.device) -> nn.Module:
    """``train.sharding: fsdp``: check what FSDP2 runs cannot do, then :func:`shard_method` with the run's
    precision (``auto``: bf16 on CUDA, fp32 otherwise) and ``train.activation_checkpointing``."""
    if not dist.is_distributed():
        raise ConfigError("train.sharding=fsdp shards over the ranks of a torchrun launch (torchrun --nproc_per_node N "
                          "-m wildssl.cli train ...); in a single plain process use train.sharding=ddp")
    for key, value in (("eval.knn_every", config["eval"]["knn_every"]), ("eval.online_probe",
                                                                         config["eval"]["online_probe"]),
                       ("train.compile", config["train"]["compile"])):
        if value:
            raise ConfigError(f"{key}={value} is not supported with train.sharding=fsdp (it reads the encoder outside "
                              "the sharded forward); set it to 0/false and evaluate the exported checkpoint "
                              "(wildssl export --checkpoint RUN)")
    precision = config["train"]["precision"]
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return shard_method(method, precision, config["train"]["activation_checkpointing"], device.type)


def nonfinite_shards(method: nn.Module) -> bool:
    """True when any rank's shard of any floating-point parameter or buffer holds a NaN or an infinity."""
    bad = torch.zeros(())
    for tensor in [*method.parameters(), *method.buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad = torch.ones(())
            break
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bool(bad)


def save_run_checkpoint(out_dir: Path, method: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        config: dict, extra: dict, keep_as: str | None = None) -> Path:
    """Write ``out_dir/checkpoint.dcp`` (every rank calls it): into a fresh directory first, which replaces the
    previous checkpoint only once complete, so an interrupted write leaves the last good one. ``keep_as``: a folder
    name in ``out_dir`` that also keeps a copy of it (``train.keep_every``)."""
    final = Path(out_dir) / SHARDED_CHECKPOINT
    partial = final.with_name(final.name + ".tmp")
    if dist.is_main_process() and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    save_sharded(partial, method, optimizer, step)
    if dist.is_main_process():
        state = {"step": step, "config": config, "eval_network": run_eval_network(method, config),
                 "extra": extra}
        (partial / RUN_STATE).write_text(json.dumps(state))
        previous = final.with_name(final.name + ".old")
        if final.exists():
            os.replace(final, previous)
        os.replace(partial, final)
        shutil.rmtree(previous, ignore_errors=True)
        if keep_as is not None:
            kept = Path(out_dir) / keep_as
            shutil.rmtree(kept, ignore_errors=True)  # a copy of a replayed step, after a resume
            shutil.copytree(final, kept)
    dist.barrier()
    return final


def read_run_state(directory: Path) -> dict:
    """``wildssl.json`` of a sharded run checkpoint: ``{"step", "config", "eval_network", "extra"}``."""
    path = Path(directory) / RUN_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path} (a sharded checkpoint's run state): {error}") from None
