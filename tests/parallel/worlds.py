"""The cases tests/parallel runs on several gloo ranks, launched once per world size for the whole session.

A launch costs each rank its interpreter's start-up (torch, DeepSpeed: seconds),
so every case of a world size runs in one torchrun launch of tp_worker.py, and
each test reads its own case's result. The parametrizations of the tests are
the lists here, so a test and the launch cannot disagree on what ran.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamem.ports import free_port
from tests.parallel.tp_worker import case_name
from tests.paths import REPO

WORKER = REPO / "tests/parallel/tp_worker.py"

COLLECTIVES_TP = (2, 4)
LAYER_CASES = [("column", 2, "reference"), ("column", 4, "reference"), ("table", 2, "reference"),
               ("table", 4, "reference"), ("column", 2, "cpu"), ("table", 2, "cpu")]
MODEL_CASES = [("memoryformer", "column", 2, "layernorm"), ("memoryformer", "column", 4, "layernorm"),
               ("memoryformer", "table", 2, "layernorm"), ("memoryformer", "table", 4, "layernorm"),
               ("memoryformer", "column", 2, "rmsnorm"), ("dense", "column", 2, "layernorm"),
               ("dense", "column", 4, "layernorm")]
BYTES_TP = (2, 4)
PIPELINE_CASES = [(1, 2), (2, 2)]           # (tp, pp)
MEMORY_TP = (1, 2)                          # on two ranks: one process's layout replicated (dp 2), and tp 2


def cases_for(world: int) -> list[str]:
    """Every case of a world size, in the order they run (the pipeline's DeepSpeed set-up last)."""
    cases = [case_name("collectives")] if world in COLLECTIVES_TP else []
    cases += [case_name("layer", (layout, kernel)) for layout, tp, kernel in LAYER_CASES if tp == world]
    cases += [case_name("model", (arch, layout, "fp32", norm3)) for arch, layout, tp, norm3 in MODEL_CASES
              if tp == world]
    if world == 2:
        cases += [case_name("model", ("memoryformer", "column", "fp16", "layernorm")), case_name("allocation"),
                  case_name("batch_check")]
    cases += [case_name("block_bytes")] if world in BYTES_TP else []
    cases += [case_name("pipeline_allocation", (str(tp), str(pp))) for tp, pp in PIPELINE_CASES if tp * pp == world]
    cases += [case_name("memory", (str(tp),)) for tp in MEMORY_TP if world == 2]
    return cases


class Worlds:
    """Launches each world size's cases when first asked for in the session (tests/shared.py); `result` is one
    case's JSON, or a failure naming it."""

    def __init__(self, shared):
        self.shared = shared

    def result(self, world: int, scenario: str, *args: str):
        out_dir, log = self._launch(world)
        name = case_name(scenario, tuple(args))
        path = out_dir / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        errors = sorted(out_dir.glob(f"{name}.rank*.error"))
        if errors:
            pytest.fail(f"{name} on {world} ranks raised:\n{errors[0].read_text()}")
        pytest.fail(f"{name} on {world} ranks did not run (an earlier case of the launch failed, or the launch "
                    f"did): {sorted(p.name for p in out_dir.iterdir())}\n{log}")

    def _launch(self, world: int) -> tuple[Path, str]:
        def make(out_dir: Path) -> dict:
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                                     "--master_port", str(free_port()), str(WORKER), str(out_dir),
                                     *cases_for(world)], cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=900)
            return {"log": f"exit {result.returncode}\n{result.stdout[-2000:]}{result.stderr[-5000:]}"}

        out_dir, made = self.shared.once(f"world{world}", make)
        return out_dir, made["log"]
