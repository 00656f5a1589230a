import math

import numpy as np
import torch

from wildssl.train.config import build_config
from wildssl.train.optim import (apply_schedules, build_optimizer, build_schedules, cosine_schedule,
                                 parameter_groups, steps_from_epochs)


def test_cosine_schedule_matches_formula():
    values = cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=5, warmup_start=0.0)
    assert values.shape == (20,)
    np.testing.assert_allclose(values[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    for i in range(5, 20):
        t = (i - 5) / 15
        assert math.isclose(values[i], 0.1 + 0.45 * (1 + math.cos(math.pi * t)), rel_tol=1e-12)
    assert values[5] == 1.0


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
        self.linear = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Module()
        self.head.last_layer = torch.nn.Linear(8, 3, bias=False)
        self.frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)


def test_parameter_groups_exclude_biases_norms_tokens_from_decay_and_isolate_last_layer():
    model = _Toy()
    groups = parameter_groups(model)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.linear.weight)]["wd_scale"] == 1.0
    for p in (model.linear.bias, model.norm.weight, model.norm.bias, model.pos_embed):
        assert by_id[id(p)]["wd_scale"] == 0.0
    assert by_id[id(model.head.last_layer.weight)]["is_last_layer"]
    assert id(model.frozen) not in by_id
    optimizer = build_optimizer(model)
    apply_schedules(optimizer, lr=0.5, weight_decay=0.1, freeze_last_layer=True)
    for group in optimizer.param_groups:
        assert group["lr"] == (0.0 if group["is_last_layer"] else 0.5)
        assert group["weight_decay"] == 0.1 * group["wd_scale"]


def test_lr_scales_with_global_batch_and_epochs_convert_once():
    config = build_config("dino_quick", ["optim.lr=0.001", "optim.warmup_epochs=2"])
    schedules = build_schedules(config, total_steps=100, global_batch_size=512, steps_per_epoch=10)
    assert math.isclose(schedules["lr"][20], 0.001 * 512 / 256)
    assert schedules["lr"][0] == 0.0 and schedules["lr"][19] < schedules["lr"][20]
    assert schedules["momentum"][0] == config["ema"]["momentum"]
    assert steps_from_epochs(2.5, dataset_size=1000, global_batch_size=64) == math.ceil(2.5 * 15)
