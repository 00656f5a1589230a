import math

import numpy as np

from wildssl.schedules import cosine_schedule
from wildssl.train.config import build_config
from wildssl.train.optim import apply_schedules, build_optimizer, build_schedules


def test_cosine_schedule_matches_formula():
    values = cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=5, warmup_start=0.0)
    assert values.shape == (20,)
    np.testing.assert_allclose(values[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    for i in range(5, 20):
        t = (i - 5) / 15
        assert math.isclose(values[i], 0.1 + 0.45 * (1 + math.cos(math.pi * t)), rel_tol=1e-12)
    assert values[5] == 1.0


def _dino(*extra):
    from conftest import tiny_overrides
    from wildssl.methods import build_method

    config = build_config("dino_quick", tiny_overrides("dino", *extra))
    return build_method(config), config


def test_method_declares_groups_without_decay_on_biases_norms_tokens_and_isolates_the_prototypes():
    method, _ = _dino()
    groups = method.parameter_groups()
    by_name = {}
    ids = {id(p): name for name, p in method.named_parameters()}
    for group in groups:
        for p in group["params"]:
            by_name[ids[id(p)]] = group
    backbone = "student.backbone."
    assert by_name[backbone + "blocks.0.attn.qkv.weight"]["wd_scale"] == 1.0
    for name in ("blocks.0.attn.qkv.bias", "norm.weight", "pos_embed", "cls_token"):
        assert by_name[backbone + name]["wd_scale"] == 0.0, name
    prototypes = [n for n, g in by_name.items() if g["is_last_layer"]]
    assert prototypes and all(n.startswith("student.head.last_layer.") for n in prototypes)
    assert not any(n.startswith("teacher.") for n in by_name)  # the teacher is never optimized
    assert "student.backbone.mask_token" not in by_name  # DINO does not mask
    optimizer = build_optimizer(groups)
    apply_schedules(optimizer, lr=0.5, weight_decay=0.1, freeze_last_layer=True)
    for group in optimizer.param_groups:
        assert group["lr"] == (0.0 if group["is_last_layer"] else 0.5)
        assert group["weight_decay"] == 0.1 * group["wd_scale"]


def test_layer_decay_scales_each_block_by_its_depth():
    method, _ = _dino("optim.layer_decay=0.5", "model.depth=3")
    depth = method.student["backbone"].depth
    scales = {}
    ids = {id(p): name for name, p in method.named_parameters()}
    for group in method.parameter_groups():
        for p in group["params"]:
            scales[ids[id(p)]] = group["lr_scale"]
    assert scales["student.backbone.patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    for block in range(depth):
        assert scales[f"student.backbone.blocks.{block}.mlp.fc1.weight"] == 0.5 ** (depth - block)
    assert scales["student.backbone.norm.weight"] == 1.0 and scales["student.head.mlp.0.weight"] == 1.0


def test_lr_scales_with_global_batch():
    config = build_config("dino_quick", ["optim.lr=0.001", "optim.warmup_epochs=2"])
    schedules = build_schedules(config, total_steps=100, global_batch_size=512, steps_per_epoch=10)
    assert math.isclose(schedules["lr"][20], 0.001 * 512 / 256)
    assert schedules["lr"][0] == 0.0 and schedules["lr"][19] < schedules["lr"][20]
    assert schedules["momentum"][0] == config["ema"]["momentum"]


def test_budgets_in_epochs_and_images_seen_convert_to_steps_once():
    from wildssl.train.run import total_steps_of

    config = build_config("dino_quick", ["train.batch_size=64", "train.epochs=2.5"])
    assert total_steps_of(config, first_source_size=1000, images_per_step=64) == math.ceil(2.5 * 15)
    config = build_config("dino_quick", ["train.batch_size=64", "train.images=6400"])
    assert total_steps_of(config, first_source_size=1000, images_per_step=80) == 80  # AB: 64 + 16 per step
    assert total_steps_of(config, first_source_size=1000, images_per_step=64) == 100


def _adamw_by_formula(theta, grads, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """Loshchilov & Hutter's AdamW (decoupled decay, bias-corrected moments), written out in float64."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        theta = theta * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def test_the_fused_and_the_foreach_update_both_follow_adamws_formula_on_the_cpu():
    import torch

    rng = np.random.default_rng(0)
    start = rng.normal(size=(5, 7))
    grads = [rng.normal(size=(5, 7)) for _ in range(6)]
    expected = _adamw_by_formula(start, grads, lr=0.01, weight_decay=0.1)
    for fused in (False, True):
        parameter = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
        optimizer = build_optimizer([{"params": [parameter], "lr_scale": 1.0, "wd_scale": 1.0,
                                      "is_last_layer": False}], fused=fused)
        apply_schedules(optimizer, lr=0.01, weight_decay=0.1, freeze_last_layer=False)
        for g in grads:
            parameter.grad = torch.tensor(g)
            optimizer.step()
        np.testing.assert_allclose(parameter.detach().numpy(), expected, rtol=0, atol=1e-12, err_msg=f"fused={fused}")


def test_a_cpu_run_steps_with_the_fused_adamw(tmp_path):
    """The fused AdamW kernel exists on the CPU since torch 2.4 and takes 0.3x the foreach update's time on a quick
    recipe's parameters (benchmarks/demo.md, twenty-ninth round); the engine used it on CUDA only."""
    from conftest import tiny_config
    from wildssl.train.run import build_run

    run = build_run(tiny_config("dino", "train.steps=2"), tmp_path / "run")
    assert run.device.type == "cpu" and run.optimizer.defaults["fused"] is True
