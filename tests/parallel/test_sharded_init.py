"""Each tensor-parallel rank initialises its own shards; joined, they are the one-process model.

No process group is needed: building, splitting and initialising a rank's shards
runs no collective, so every rank of tp = 2 or 4 is built here in one process,
and their state dicts are joined as megamem export joins a checkpoint's files.
"""
from __future__ import annotations

import pytest
import torch

from megamem.checkpoint.read import join_tensor_parallel
from megamem.config import load_config
from megamem.model import build_model
from megamem.model.init import materialize
from megamem.parallel.mappings import TensorParallelGroup
from megamem.parallel.parallelize import parallelize
from megamem.parallel.sharding import shard_records
from megamem.parallel.state import ParallelState
from tests.parallel.tp_worker import SMALL
from tests.paths import CONFIGS


def rank_state(overrides: list[str], tp: int, rank: int) -> tuple[dict, dict]:
    config = load_config([CONFIGS / "cpu-smoke.yaml"], [*overrides, f"parallel.tp={tp}"])
    model = build_model(config, device="meta")
    parallelize(model, config, ParallelState(tp, 1, 1, rank, tensor_parallel=TensorParallelGroup(None, tp, rank)))
    materialize(model, "cpu", config.run.seed)
    return model.state_dict(), shard_records(model)


@pytest.mark.parametrize("overrides", [
    ["parallel.table_sharding=column", "model.memory_bias=true"],
    ["parallel.table_sharding=table", "model.memory_bias=true"],
    ["model.arch=dense"],
    ["model.tie_embeddings=true", "model.norm3=rmsnorm"],
])
@pytest.mark.parametrize("tp", [2, 4])
def test_joined_shards_are_the_one_process_model(overrides, tp):
    whole = build_model(load_config([CONFIGS / "cpu-smoke.yaml"], [*SMALL, *overrides])).state_dict()
    ranks = [rank_state([*SMALL, *overrides], tp, rank) for rank in range(tp)]
    parts = ranks[0][1]
    assert any(name.endswith(".tables") for name in parts) or "dense" in overrides[0]
    joined = join_tensor_parallel([state for state, _ in ranks], parts)
    assert set(joined) == set(whole)
    for name, tensor in whole.items():
        assert torch.equal(joined[name][: tensor.shape[0]], tensor), name
    for name in parts:                                   # a shard really is a part: no rank holds the whole
        assert ranks[0][0][name].numel() * tp == joined[name].numel(), name
