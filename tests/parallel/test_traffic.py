"""The traffic formulas against the figures of the design they implement, at MF-base, tp = 8, bf16.

The counters equal these formulas (test_tensor_parallel.py); this pins the
formulas themselves to the byte arithmetic of the design: per token per block,
the column layout receives about 2,250 bytes forward and 1,810 backward, a
Megatron sequential block with sequence parallelism 7,170 and 10,750, so
MemoryFormer moves about 23% of the dense block's bytes (15% with fp16 p).
"""
from __future__ import annotations

import pytest

from megamem.config import load_config
from megamem.parallel import traffic
from tests.paths import CONFIGS

TOKENS = 2048


def per_token(block: traffic.Traffic) -> tuple[float, float]:
    return block.forward / TOKENS, block.backward / TOKENS


def test_mf_base_at_tp_8_moves_what_the_design_says():
    base = load_config([CONFIGS / "memoryformer-base.yaml"]).model
    dense = load_config([CONFIGS / "pythia-410m.yaml"]).model
    column = per_token(traffic.memoryformer_block(base, 8, "column", "fp32", 2, TOKENS))
    half = per_token(traffic.memoryformer_block(base, 8, "column", "fp16", 2, TOKENS))
    megatron = per_token(traffic.megatron_sequential_block(dense, 8, 2, TOKENS))
    pythia = per_token(traffic.pythia_block(dense, 8, 2, TOKENS))
    # replicated weights' gradients add a few bytes per token (a d-sized all-reduce per micro-batch)
    assert column == pytest.approx((2250, 1810), rel=0.01)
    assert megatron == pytest.approx((7170, 10750), rel=0.01)
    assert sum(column) / sum(megatron) == pytest.approx(0.23, abs=0.01)
    assert sum(half) / sum(megatron) == pytest.approx(0.15, abs=0.01)
    assert pythia == pytest.approx((2 * 2 * 1024 * 7 / 8,) * 2, rel=0.01)      # one all-gather + one reduce-scatter
    table = per_token(traffic.memoryformer_block(base, 8, "table", "fp32", 2, TOKENS))
    assert sum(table) > sum(megatron)                                           # why column is the default
