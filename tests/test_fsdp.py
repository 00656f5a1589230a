"""FSDP2 on the CPU with 2 gloo processes: the same losses and updated weights as one process, a sharded
(DCP) checkpoint that resumes exactly, and its export to one consolidated encoder file."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import PROCESS_GROUP, tiny_config
from wildssl.data.vocabulary import Vocabulary
from wildssl.losses.wsp_loss import wsp_loss
from wildssl.methods.wsp import WSP

WORLD, BATCH, LABELS = 2, 8, 5


class FixedViewWSP(WSP):
    """WSP on given normalized images (no random views), so that a half batch per rank sees exactly the
    rows of the full batch."""

    def forward(self, batches, step=None):
        batch = batches["train"]
        logits = self.student["head"](self.student["backbone"](batch["pixels"])["cls"])
        return {"loss": wsp_loss(logits, batch["targets"]), "metrics": {}}


def _data():
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(BATCH, 3, 16, 16, generator=generator)
    targets = (torch.rand(BATCH, LABELS, generator=generator) < 0.4).float()
    targets[:, 0] = 1  # every image labelled
    return images, targets


def _method(vocabulary, run_dir, seed=0):
    torch.manual_seed(seed)
    method = FixedViewWSP(tiny_config("wsp", "model.depth=2", f"method.vocabulary={vocabulary}"))
    method.prepare({}, run_dir)
    return method


def _step(method, optimizer, images, targets):
    loss = method({"train": {"pixels": images, "targets": targets}})["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def _optimizer(method):
    # SGD with momentum: its update is proportional to the gradient. (Adam would turn the float noise of
    # gradients that are zero in exact arithmetic, such as the attention key bias's, into +-lr steps.)
    return torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                           weight_decay=0.05)


def _worker(rank, tmp):
    from wildssl.train.fsdp import full_state, load_sharded, save_sharded, shard_method

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    images, targets = _data()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    method = shard_method(_method(f"{tmp}/vocabulary.txt", f"{tmp}/run"), "fp32", activation_checkpointing=True,
                          device_type="cpu")
    optimizer = _optimizer(method)
    losses = []
    for step in range(2):
        loss = _step(method, optimizer, images[rows], targets[rows])
        dist.all_reduce(loss)
        losses.append(loss / WORLD)
        if step == 0:
            save_sharded(f"{tmp}/sharded", method, optimizer, step=1)
    uninterrupted = full_state(method)
    # resume: another initialization, then the checkpoint of step 1, then step 2 again
    resumed = shard_method(_method(f"{tmp}/vocabulary.txt", f"{tmp}/run", seed=1), "fp32", True, device_type="cpu")
    resumed_optimizer = _optimizer(resumed)
    assert load_sharded(f"{tmp}/sharded", resumed, resumed_optimizer) == 1
    _step(resumed, resumed_optimizer, images[rows], targets[rows])
    after_resume = full_state(resumed)
    if rank == 0:
        torch.save({"losses": losses, "uninterrupted": uninterrupted, "resumed": after_resume}, f"{tmp}/result.pt")
    dist.barrier()
    dist.destroy_process_group()


@PROCESS_GROUP
def test_fsdp2_on_two_gloo_processes_equals_one_process_and_resumes_exactly(tmp_path):
    from wildssl.models.loading import load_encoder
    from wildssl.train.fsdp import export_consolidated

    Vocabulary([f"label{i}" for i in range(LABELS)]).save(tmp_path / "vocabulary.txt")
    images, targets = _data()
    reference = _method(tmp_path / "vocabulary.txt", tmp_path / "reference")
    optimizer = _optimizer(reference)
    losses = [_step(reference, optimizer, images, targets)]
    after_first = {k: v.clone() for k, v in reference.state_dict().items()}
    losses.append(_step(reference, optimizer, images, targets))

    # fork: the workers inherit the imported modules (spawn would import torch and wildssl again, ~10 s each)
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="fork")
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    torch.testing.assert_close(torch.stack(result["losses"]), torch.stack(losses), rtol=1e-5, atol=1e-6)
    expected = reference.state_dict()
    assert result["uninterrupted"].keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(result["uninterrupted"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        assert torch.equal(result["resumed"][key], result["uninterrupted"][key]), key  # exact resume

    export_consolidated(tmp_path / "sharded", tmp_path / "encoder.safetensors", reference.config["model"])
    encoder = load_encoder(tmp_path / "encoder.safetensors").state_dict()
    for key, value in encoder.items():
        torch.testing.assert_close(value, after_first[f"student.backbone.{key}"], rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp_precision_policies():
    from wildssl.errors import ConfigError
    from wildssl.train.fsdp import mixed_precision

    bf16 = mixed_precision("bf16")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    assert mixed_precision("fp32").param_dtype is None
    with pytest.raises(ConfigError, match="not one of bf16, fp32"):
        mixed_precision("fp16")


def test_engine_with_fsdp_sharding_resumes_exactly_and_exports_one_encoder_file(tmp_path):
    """The engine's train.sharding=fsdp path in one process (a gloo group of one rank): DCP checkpoints,
    --resume, and wildssl export of the sharded run."""
    from conftest import tiny_overrides
    from wildssl.cli import main
    from wildssl.models.loading import load_encoder
    from wildssl.train.config import build_config
    from wildssl.train.engine import train

    # constant lr and weight decay, so that a 2-step run resumed to 4 steps follows the 4-step run exactly
    overrides = tiny_overrides("wsp", "method.labels=manifest", "train.sharding=fsdp", "model.depth=2",
                               "train.activation_checkpointing=true", "train.checkpoint_every=2", "train.keep_every=2",
                               "optim.lr=1e-3",
                               "optim.min_lr=1e-3", "optim.warmup_epochs=0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        train(build_config("wsp_quick", overrides + ["train.steps=4"]), tmp_path / "whole")
        train(build_config("wsp_quick", overrides + ["train.steps=2"]), tmp_path / "resumed")
        summary = train(build_config("wsp_quick", overrides + ["train.steps=4"]), tmp_path / "resumed", resume=True)
    finally:
        dist.destroy_process_group()
    assert summary["start_step"] == 2 and summary["steps"] == 4
    assert (tmp_path / "whole" / "checkpoint.dcp" / "wildssl.json").is_file()
    for run in ("whole", "resumed"):
        assert main(["export", "--checkpoint", str(tmp_path / run), "--out", str(tmp_path / f"{run}.safetensors")]) == 0
    from wildssl.models.loading import read_checkpoint_config

    run_pool = build_config("wsp_quick", overrides)["eval"]["pool"]
    assert read_checkpoint_config(tmp_path / "whole.safetensors")["eval"] == {"pool": run_pool}  # read as the run
    whole = load_encoder(tmp_path / "whole.safetensors").state_dict()
    resumed = load_encoder(tmp_path / "resumed.safetensors").state_dict()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    initial = _method_like_init()
    assert any(not torch.equal(whole[k], initial[k]) for k in whole if k != "mask_token")  # it trained
    # train.keep_every keeps each kept step's sharded checkpoint (it was ignored), and export reads a kept copy
    kept = tmp_path / "whole" / "checkpoint_0000002.dcp"
    assert (kept / "wildssl.json").is_file() and (tmp_path / "whole" / "checkpoint_0000004.dcp").is_dir()
    assert main(["export", "--checkpoint", str(kept), "--out", str(tmp_path / "kept.safetensors")]) == 0
    at_2 = load_encoder(tmp_path / "kept.safetensors").state_dict()
    assert any(not torch.equal(at_2[k], whole[k]) for k in whole)  # step 2's weights, not step 4's
    # --timm of a sharded run (it was refused with "no checkpoint"): the same weights under timm's names
    from wildssl.models.export import timm_state_dict

    assert main(["export", "--checkpoint", str(tmp_path / "whole"), "--timm", "--out", str(tmp_path / "t.safetensors")]) == 0
    from safetensors.torch import load_file

    timm_tensors = load_file(tmp_path / "t.safetensors")
    expected = timm_state_dict(load_encoder(tmp_path / "whole.safetensors"))
    assert timm_tensors.keys() == expected.keys()
    assert all(torch.equal(timm_tensors[k], expected[k]) for k in expected)
    # an evaluation given the sharded run says how to read it, in one line (it said "no checkpoint")
    from wildssl.errors import CheckpointError

    for path in (tmp_path / "whole", kept):
        with pytest.raises(CheckpointError, match="train.sharding=fsdp.*wildssl export --checkpoint"):
            load_encoder(path)


def _method_like_init():
    from conftest import tiny_config
    from wildssl.methods import build_method

    torch.manual_seed(0)
    return build_method(tiny_config("wsp", "method.labels=manifest", "model.depth=2")).student["backbone"].state_dict()
