"""benchmarks/kernel_parity.py, the check scripts/gpu_check.sh runs at the shipped layer shapes on a GPU: here one
small layer in Triton's interpreter (the shipped shapes take minutes there), in fp32 and bf16."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.paths import REPO


@pytest.fixture
def kernel_parity(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))          # the script imports memory_layer beside it
    return importlib.import_module("kernel_parity")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_row_holds_triton_to_the_reference_and_fails_a_tighter_bound(kernel_parity, monkeypatch, dtype):
    row = kernel_parity.compare("test/layer", 24, 130, 8, 100, dtype, torch.device("cpu"))
    assert set(row) == {"layer", "d_in", "d_out", "bits", "tokens", "dtype", "y_error", "dx_error", "dtables_error",
                        "bound", "repeat_bitwise", "ok"}
    assert row["ok"] and row["repeat_bitwise"] and 0 < max(row["y_error"], row["dx_error"]) <= row["bound"]
    monkeypatch.setitem(kernel_parity.BOUNDS, dtype, min(row["y_error"], row["dx_error"]) / 2)
    assert not kernel_parity.compare("test/layer", 24, 130, 8, 100, dtype, torch.device("cpu"))["ok"]
