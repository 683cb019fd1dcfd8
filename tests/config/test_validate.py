"""Cross-field rules: each impossible combination gives its own message and fix."""
from __future__ import annotations

import pytest

from megamem.config import ConfigError, load_config, padded_vocab_size, validate_world
from tests.paths import CONFIGS

SMOKE = CONFIGS / "cpu-smoke.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=100"],
     r"model\.hidden_size=100, model\.tau=8: hidden_size must be a multiple of tau.*"
     r"Fix: use a hidden_size that is a multiple of 8, e\.g\. 104"),
    (["model.num_heads=5"], r"num_heads must divide hidden_size.*divisors of 128"),
    (["model.tau=3"], r"model\.tau=3: tau must lie in \[4, 12\]"),
    (["model.tau=13"], r"tau must lie in \[4, 12\]"),
    (["parallel.tp=8"], r"parallel\.tp=8, model\.num_heads=4: tp must divide the number of heads"),
    (["parallel.tp=4", "model.seq_len=130"], r"parallel\.tp=4, model\.seq_len=130: tp must divide the positions"),
    (["parallel.table_sharding=rows"], r"parallel\.table_sharding must be 'column' or 'table'"),
    (["model.hidden_size=64", "model.num_heads=16", "parallel.tp=16", "model.rotary_fraction=0.5"],
     r"parallel\.tp=16, model\.hidden_size=64, model\.tau=8: tp must divide K = hidden_size / tau = 8"),
    (["parallel.pp=2", "parallel.zero_stage=3"], r"DeepSpeed refuses ZeRO stage 2 or 3 with pipeline parallelism"),
    (["parallel.pp=3"], r"more pipeline stages than blocks.*parallel\.pp <= 2"),
    (["parallel.tp=2", "parallel.zero_stage=0", "train.precision=bf16"],
     r"without ZeRO takes the gradient norm .* from tensor-parallel rank 0's gradients alone.*zero_stage=1"),
    (["parallel.zero_stage=4"], r"ZeRO stages are 0, 1, 2 and 3"),
    (["model.weighting=l1", "model.temperature=0.5"], r"l1 weighting fixes the temperature at 1"),
    (["model.rotary_fraction=0.3"], r"rotary dims per head = int\(32 x fraction\) = 9 must be even"),
    (["model.kernel=magic"], r"unknown Memory Layer kernel \(available: auto, cpu, reference, triton\)"),
    (["train.global_batch_size=10"], r"global batch must be a multiple of the micro batch"),
    (["schedule.min_lr=1.0"], r"min_lr must lie in \[0, lr\]"),
    (["data.path=a", "data.sources=[{path: b, weight: 1}]"], r"give either one dataset \(data\.path\) or a blend"),
    (["model.num_layers=0"], r"model\.num_layers=0: must be positive"),
])
def test_impossible_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([SMOKE], overrides)


def test_message_names_the_file_that_set_the_key(tmp_path):
    bad = tmp_path / "wide.yaml"
    bad.write_text("model: {hidden_size: 100}\n")
    with pytest.raises(ConfigError, match=r"^(cpu-smoke|.*wide\.yaml)"):
        load_config([SMOKE, bad])
    with pytest.raises(ConfigError, match=str(bad).replace(".", r"\.")):
        load_config([SMOKE, bad])


def test_world_size_arithmetic():
    config = load_config([SMOKE], ["parallel.tp=2", "train.global_batch_size=32"])
    assert validate_world(config, 4) == 2
    with pytest.raises(ConfigError,
                       match=r"3 processes cannot host parallel\.tp=2 x parallel\.pp=1 = 2 ranks per replica"):
        validate_world(config, 3)
    with pytest.raises(ConfigError, match=r"global_batch_size=32 is not a multiple of "
                                          r"train\.micro_batch_size=4 x data-parallel size 3 = 12"):
        validate_world(config, 6)


def test_vocabulary_padding_is_divisible_by_tp():
    config = load_config([CONFIGS / "memoryformer-tiny.yaml"], ["parallel.tp=8"])
    padded = padded_vocab_size(config.model, config.parallel)
    assert padded == 51200 and padded % (128 * 8) == 0
