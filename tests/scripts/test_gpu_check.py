"""scripts/gpu_check.sh on a machine without CUDA: it says so, runs nothing and exits 0."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.paths import REPO


def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    result = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gpu_check: no CUDA GPU here" in result.stdout and not (tmp_path / "out").exists()
