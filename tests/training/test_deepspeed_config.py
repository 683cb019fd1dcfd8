"""The generated DeepSpeed JSON."""
from __future__ import annotations

from megamem.config import load_config
from megamem.training.deepspeed_config import deepspeed_config
from tests.paths import CONFIGS


def test_batch_arithmetic_precision_zero_and_offload():
    config = load_config([CONFIGS / "memoryformer-tiny.yaml"], ["parallel.zero_stage=2", "optimizer.offload=true"])
    ds = deepspeed_config(config, dp_size=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (1024, 16, 8)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}


def test_raw_overrides_merge_into_the_generated_json():
    config = load_config([CONFIGS / "cpu-smoke.yaml"],
                         ["deepspeed={zero_optimization: {reduce_bucket_size: 1000}, wall_clock_breakdown: true}"])
    ds = deepspeed_config(config, dp_size=1)
    assert ds["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 1000} and ds["wall_clock_breakdown"] is True
