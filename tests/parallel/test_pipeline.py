"""Pipeline stages as training builds them, against megamem plan."""
from __future__ import annotations

import pytest

from megamem.config import load_config
from megamem.plan import plan_report
from tests.parallel.worlds import PIPELINE_CASES
from tests.paths import CONFIGS


@pytest.mark.parametrize("tp, pp", PIPELINE_CASES)
def test_each_stage_allocates_what_plan_reports(worlds, tp, pp):
    """A MemoryFormer of 4 blocks and a dense model of 3 (an uneven split: 2 + 1 blocks), built by the training
    code on every rank of tp x pp; each rank holds exactly the parameters and table values plan reports for its
    stage, and no other stage's (each stage allocates only its own layers)."""
    for case in worlds.result(tp * pp, "pipeline_allocation", str(tp), str(pp)):
        config = load_config([CONFIGS / "cpu-smoke.yaml"], case["overrides"])
        stages = plan_report(config, tp=tp, pp=pp, dp=1, zero=1, micro_batch=1, gpu_mem_gib=80)["stages"]
        assert len({*case["params"]}) > 1, case          # the stages differ, so a match is not by chance
        for rank, stage in enumerate(case["stage_of_rank"]):
            assert case["params"][rank] == stages[stage]["params"], (case["overrides"], rank)
            assert case["tables"][rank] == stages[stage]["table_params"], (case["overrides"], rank)
