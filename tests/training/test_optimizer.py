"""Parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math

import pytest

from megamem.config import load_config
from megamem.model import build_model
from megamem.training.optimizer import build_optimizer, build_scheduler, lr_factor, parameter_groups
from tests.paths import CONFIGS


@pytest.fixture
def config():
    return load_config([CONFIGS / "cpu-smoke.yaml"], ["model.hidden_size=64", "model.num_heads=2"])


def test_groups_cover_every_parameter_once_with_their_settings(config):
    config.optimizer.table_weight_decay = False
    config.optimizer.table_lr_multiplier = 2.0
    model = build_model(config)
    groups = {g["name"]: g for g in parameter_groups(model, config.optimizer)}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    assert groups["tables"]["weight_decay"] == 0.0 and groups["tables"]["lr"] == 2 * config.optimizer.lr
    assert groups["norms_and_biases"]["weight_decay"] == groups["other"]["weight_decay"] == 0.1
    assert (all(p.dim() == 3 for p in groups["tables"]["params"])
            and all(p.dim() == 1 for p in groups["norms_and_biases"]["params"]))
    config.optimizer.norm_weight_decay = False
    assert {g["name"]: g["weight_decay"] for g in parameter_groups(model, config.optimizer)}["norms_and_biases"] == 0.0


def test_cosine_schedule_with_warmup_to_min_lr(config):
    s, lr = config.schedule, config.optimizer.lr          # warm-up 2% of 300 steps = 6 steps, min_lr 3e-4 = 0.1 lr
    assert lr_factor(0, 300, s, lr) == pytest.approx(1 / 6) and lr_factor(5, 300, s, lr) == pytest.approx(1.0)
    assert lr_factor(6, 300, s, lr) == pytest.approx(1.0)
    assert lr_factor(153, 300, s, lr) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 147 / 294)))
    assert lr_factor(300, 300, s, lr) == pytest.approx(0.1)


def test_scheduler_keeps_each_groups_multiplier(config):
    config.optimizer.table_lr_multiplier = 3.0
    optimizer = build_optimizer(build_model(config), config.optimizer)
    scheduler = build_scheduler(optimizer, 300, config.schedule, config.optimizer.lr)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["tables"] == pytest.approx(3 * lrs["other"])
    assert lrs["other"] == pytest.approx(config.optimizer.lr * lr_factor(10, 300, config.schedule, config.optimizer.lr))
