"""Pipeline stage assignment."""
from __future__ import annotations

import pytest

from megamem.parallel.pipeline_layout import blocks_per_stage, stage_of_block


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
