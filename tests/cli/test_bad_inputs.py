"""The catalogue of inputs a user gets wrong, through the `megamem` command as a user meets them: each ends in one
line naming the thing and the fix, exit status 2, and no traceback unless --debug asks for one. (Data and shard
corruption are in tests/data_tools/test_bad_data.py, damaged checkpoints in tests/training/test_checkpoint.py.)"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.paths import CONFIGS, REPO

SMOKE = str(CONFIGS / "cpu-smoke.yaml")


def megamem(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megamem.cli.main", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def not_a_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "run"


CASES = {
    "config typo": (["train", SMOKE, "--set", "train.stepz=5"], "train.stepz"),
    "wrong type": (["train", SMOKE, "--set", "train.steps=many"], "train.steps"),
    "impossible layout": (["train", SMOKE, "--set", "parallel.tp=3"], "tp"),
    "missing config": (["train", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
    "missing data": (["train", SMOKE, "--set", "data.path=/nonexistent/data"],
                     "no dataset at /nonexistent/data: /nonexistent/data/manifest.json is missing"),
    "empty corpus": (["preprocess", "--input", "/nonexistent/*.jsonl", "--output", "{tmp}/out", "--seq-len", "32"],
                     "/nonexistent/*.jsonl"),
    "missing run to export": (["export", "{tmp}/no-run", "--output", "{tmp}/m.safetensors"], "no-run"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_mistake_is_one_clear_line_and_exit_2(name, tmp_path):
    argv, message = CASES[name]
    result = megamem(*(arg.replace("{tmp}", str(tmp_path)) for arg in argv))
    assert result.returncode == 2, (name, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and message in result.stderr, (name, result.stderr[-2000:])
    assert result.stderr.strip().count("\n") == 0 or name == "empty corpus", result.stderr


def test_an_unwritable_run_dir_fails_before_training(not_a_directory, tmp_path):
    result = megamem("train", SMOKE, "--set", f"run.dir={not_a_directory}", "--set", f"data.path={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"run.dir={not_a_directory} is not writable (Not a directory" in result.stderr, result.stderr[-2000:]


def test_debug_shows_the_traceback_too():
    result = megamem("--debug", "train", SMOKE, "--set", "train.stepz=5")
    assert result.returncode != 0 and "Traceback" in result.stderr and "train.stepz" in result.stderr
