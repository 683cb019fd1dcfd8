"""The Memory Layer module: shapes, errors, init, shared hashing, gradcheck."""
from __future__ import annotations

import pytest
import torch

from megamem.kernels import get_kernel
from megamem.model.memory_layer import MemoryLayer, released_qkv_std

REFERENCE = get_kernel("reference")


@pytest.mark.parametrize("weighting", ["paper", "l1"])
def test_gradcheck_module_float64(weighting):
    torch.manual_seed(3)
    layer = MemoryLayer(12, 7, tau=4, kernel=REFERENCE, weighting=weighting, bias=True).double()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, torch.full_like(x, -0.2), x).requires_grad_()

    def run(x, tables, bias):
        return torch.func.functional_call(layer, {"tables": tables, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(run, (x, layer.tables.detach().requires_grad_(),
                                          layer.bias.detach().requires_grad_()))


@pytest.mark.parametrize("tau", [4, 8, 10, 12])
def test_shapes_and_table_layout(tau):
    layer = MemoryLayer(3 * tau, 5, tau=tau, kernel=REFERENCE)
    assert layer.tables.shape == (3, 2**tau, 5)
    assert layer(torch.randn(2, 4, 3 * tau)).shape == (2, 4, 5)


def test_refuses_width_not_divisible_by_tau():
    with pytest.raises(ValueError, match="not a multiple of tau=8"):
        MemoryLayer(12, 4, tau=8, kernel=REFERENCE)


def test_refuses_wrong_input_width():
    layer = MemoryLayer(16, 4, tau=8, kernel=REFERENCE)
    with pytest.raises(ValueError, match=r"expects inputs of width 16, got shape \(3, 8\)"):
        layer(torch.randn(3, 8))


def test_shared_hashing_and_observed_path_equal_the_fused_forward():
    layer = MemoryLayer(16, 6, tau=8, kernel=REFERENCE, bias=True)
    x = torch.randn(5, 16)
    fused = layer(x)
    torch.testing.assert_close(layer(x, layer.hash(x)), fused)
    seen = []
    layer.observer = lambda module, codes, p, first: seen.append((module, codes.shape, p.shape, first))
    torch.testing.assert_close(layer(x), fused)
    layer.hash(x[:, 8:], first_chunk=1)
    assert seen == [(layer, (5, 2), (5, 2), 0), (layer, (5, 1), (5, 1), 1)]
    with pytest.raises(ValueError, match=r"shape \(5, 12\) does not split into them"):
        layer.hash(x[:, :12])


def test_init_follows_the_paper_and_the_released_bias():
    torch.manual_seed(0)
    layer = MemoryLayer(64, 256, tau=8, kernel=REFERENCE, bias=True)
    assert abs(layer.tables.std().item() - 0.02) < 0.001
    assert layer.bias.abs().max().item() < 0.01
    assert released_qkv_std(512) == pytest.approx((2 / 2560) ** 0.5)


def test_bf16_forward_keeps_dtype_and_fp32_p():
    layer = MemoryLayer(16, 4, tau=8, kernel=REFERENCE).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    _, p = layer.hash(x)
    assert p.dtype == torch.float32
    assert layer(x).dtype == torch.bfloat16
