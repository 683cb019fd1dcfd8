"""The megamem command: help texts, JSON output, and exit status 2 on user errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megamem.cli.main import main
from tests.paths import CONFIGS, REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megamem.cli.main", *args], cwd=REPO, capture_output=True, text=True)


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("megamem")          # installed beside the interpreter running the tests
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "megamem flops configs/memoryformer-tiny.yaml" in result.stdout


@pytest.mark.parametrize("command, phrase", [("flops", "paper formula"), ("plan", "fits in --gpu-mem")])
def test_each_subcommand_explains_itself_with_an_example(command, phrase, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert phrase in out.replace("\n", " ") and f"megamem {command} configs/" in out


def test_flops_json_acceptance():
    result = run_cli("flops", "configs/memoryformer-tiny.yaml", "--seq-len", "2048", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["block"]) == set(report["paper_formula"]) == {"attention_macs", "non_attention_macs",
                                                                    "total_macs"}
    assert round(report["paper_formula"]["total_macs"] / 1e9, 1) == 4.7
    assert round(report["paper_formula"]["non_attention_macs"] / 1e9, 1) == 0.4
    assert report["block"]["non_attention_macs"] == 352_321_536


def test_plan_json_acceptance():
    result = run_cli("plan", "configs/memoryformer-base.yaml", "--tp", "8", "--pp", "1", "--dp", "8", "--zero", "1",
                     "--micro-batch", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert abs(report["table_params"] / 6.64e9 - 1) < 0.01 and "per_rank_bytes" in report


def test_tables_are_readable():
    assert "block non-attention" in run_cli("flops", str(CONFIGS / "pythia-70m.yaml")).stdout
    assert "fits in 80 GiB" in run_cli("plan", str(CONFIGS / "memoryformer-tiny.yaml")).stdout


def test_user_errors_print_one_line_and_exit_2():
    result = run_cli("plan", "configs/memoryformer-base.yaml", "--tp", "3")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "megamem plan: error:" in result.stderr and "tp must divide the number of heads" in result.stderr
    missing = run_cli("flops", "configs/nope.yaml")
    assert missing.returncode == 2 and "config file not found: configs/nope.yaml" in missing.stderr
