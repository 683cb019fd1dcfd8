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


def test_pipelines_send_whole_tensors_and_accumulate_bf16_in_fp32():
    """Split tensors between stages would mix tensor-parallel ranks' positions; bf16 sums of micro-batch gradients
    would lose the small ones."""
    bf16 = load_config([CONFIGS / "memoryformer-tiny.yaml"], ["parallel.pp=2", "parallel.zero_stage=1"])
    ds = deepspeed_config(bf16, dp_size=4)
    assert ds["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = load_config([CONFIGS / "cpu-smoke.yaml"], ["parallel.pp=2"])
    assert "data_types" not in deepspeed_config(fp32, dp_size=1)
    assert "pipeline" not in deepspeed_config(load_config([CONFIGS / "cpu-smoke.yaml"]), dp_size=1)
