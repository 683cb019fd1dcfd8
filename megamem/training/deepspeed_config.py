"""The DeepSpeed JSON, generated from the typed config; `deepspeed:` in YAML overrides raw fields."""
from __future__ import annotations

import copy

from megamem.config.schema import Config


def deepspeed_config(config: Config, dp_size: int) -> dict:
    train, opt = config.train, config.optimizer
    accumulation = train.global_batch_size // (train.micro_batch_size * dp_size)
    zero: dict = {"stage": config.parallel.zero_stage}
    if opt.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    generated = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if config.parallel.pp > 1:
        # whole tensors between stages: the defaults would split them over tensor-parallel ranks, which hold
        # different positions of the sequence-parallel residual
        generated["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        if train.precision == "bf16":           # micro-batches' gradients add up in fp32, not in bf16
            generated["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(generated, config.deepspeed)


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = (_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else value)
    return merged
