"""Pipeline stage assignment."""
from __future__ import annotations

import pytest

from megamem.parallel.pipeline_layout import blocks_per_stage, layer_names, stage_bounds, stage_of_block


def test_balanced_contiguous_split():
    assert blocks_per_stage(24, 5) == [5, 5, 5, 5, 4]
    assert blocks_per_stage(6, 1) == [6]
    counts = blocks_per_stage(7, 3)
    assert [stage_of_block(i, counts) for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]


def test_impossible_splits_are_refused():
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3 pipeline stages"):
        blocks_per_stage(2, 3)
    with pytest.raises(IndexError, match="block 7 is beyond the 7 blocks"):
        stage_of_block(7, [3, 2, 2])


@pytest.mark.parametrize("num_layers", [2, 3, 4, 5, 7, 12, 24, 36])
def test_stage_bounds_are_deepspeeds_split_by_block_type(num_layers):
    """The pipeline checks this at start-up too; here every split plan reports for these depths is covered."""
    from deepspeed.runtime.utils import partition_balanced

    for pp in range(1, min(num_layers, 8) + 1):
        ours = stage_bounds(num_layers, pp)
        assert [int(b) for b in partition_balanced([0, *[1] * num_layers, 0, 0], pp)] == ours, (num_layers, pp)
        names = layer_names(num_layers)
        assert names[ours[0]] == "embed" and names[ours[-1] - 1] == "head"
        for stage, blocks in enumerate(blocks_per_stage(num_layers, pp)):
            held = [name for name in names[ours[stage]:ours[stage + 1]] if name.startswith("blocks.")]
            assert len(held) == blocks, (num_layers, pp, stage)
