"""The reference Memory Layer against docs/model.md, "The Memory Layer", equation by equation."""
from __future__ import annotations

import itertools

import pytest
import torch

from megamem.kernels.reference import chunk_hash, gather_sum


def test_hash_bit_order_and_zero_counts_as_positive():
    # bit i is set where z_i >= 0; h = sum_i bit_i 2^i
    x = torch.tensor([[1.0, -1.0, 0.0, -2.0,   -0.5, -0.5, -0.5, 3.0]])
    codes, _ = chunk_hash(x, tau=4, temperature=1.0, weighting="paper")
    assert codes.tolist() == [[0b0101, 0b1000]]


def test_hash_gives_every_code_for_every_sign_pattern():
    tau = 5
    patterns = torch.tensor(list(itertools.product([1.0, -1.0], repeat=tau)))
    codes, _ = chunk_hash(patterns, tau, 1.0, "paper")
    assert sorted(codes.squeeze(-1).tolist()) == list(range(2**tau))


@pytest.mark.parametrize("tau", [2, 4, 6])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_p_closed_form_equals_softmax_over_all_codes(tau, temperature):
    torch.manual_seed(tau)
    z = torch.randn(50, tau, dtype=torch.float64) * 2
    all_codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=tau)), dtype=torch.float64)   # [2^tau, tau]
    logits = z @ all_codes.T / temperature
    own = z.abs().sum(-1) / temperature                     # <z, sign(z)> / t, the retrieved code's logit
    softmax_p = torch.exp(own - torch.logsumexp(logits, dim=-1))
    _, p = chunk_hash(z, tau, temperature, "paper")
    torch.testing.assert_close(p.squeeze(-1).double(), softmax_p, rtol=1e-6, atol=1e-7)
    assert (p > 2.0**-tau).all() and (p <= 1).all()


def test_p_is_fp32_whatever_the_input_dtype():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    codes, p = chunk_hash(x, 8, 1.0, "paper")
    assert p.dtype == torch.float32 and codes.dtype == torch.int64


def test_l1_weighting_multiplies_p_by_the_chunk_norm():
    x = torch.randn(6, 16)
    _, p_paper = chunk_hash(x, 8, 1.0, "paper")
    _, p_l1 = chunk_hash(x, 8, 1.0, "l1")
    torch.testing.assert_close(p_l1, p_paper * x.view(6, 2, 8).abs().sum(-1))


def test_gather_sum_is_the_weighted_sum_of_retrieved_rows():
    torch.manual_seed(0)
    tables = torch.randn(3, 16, 5)
    codes = torch.randint(0, 16, (7, 3))
    p = torch.rand(7, 3)
    bias = torch.randn(5)
    expected = torch.stack([sum(p[n, k] * tables[k, codes[n, k]] for k in range(3)) for n in range(7)]) + bias
    torch.testing.assert_close(gather_sum(codes, p, tables, bias), expected)


@pytest.mark.parametrize("weighting", ["paper", "l1"])
def test_gradcheck_inputs_tables_and_bias(weighting):
    torch.manual_seed(1)
    tau, temperature = 4, (0.7 if weighting == "paper" else 1.0)
    x = torch.randn(6, 3 * tau, dtype=torch.float64)
    # finite differences must not flip a sign
    x = torch.where(x.abs() < 0.05, torch.full_like(x, 0.3), x).requires_grad_()
    tables = torch.randn(3, 2**tau, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def layer(x, tables, bias):
        codes, p = chunk_hash(x, tau, temperature, weighting)
        return gather_sum(codes, p, tables, bias)

    assert torch.autograd.gradcheck(layer, (x, tables, bias))


def test_input_gradient_matches_the_spec_formula():
    torch.manual_seed(2)
    tau, t = 4, 0.8
    x = torch.randn(5, 2 * tau, dtype=torch.float64, requires_grad=True)
    tables = torch.randn(2, 2**tau, 3, dtype=torch.float64)
    dy = torch.randn(5, 3, dtype=torch.float64)
    codes, p = chunk_hash(x, tau, t, "paper")
    gather_sum(codes, p, tables, None).backward(dy)
    # dL/dp_k = <dy, T_k[h_k]>;  dL/dz_ki = dL/dp_k * p_k * (2/t) * sign(z_ki) * (1 - sigmoid(2|z_ki|/t))
    rows = torch.stack([tables[k, codes[:, k]] for k in range(2)], dim=1)          # [5, 2, 3]
    dp = (rows * dy[:, None, :]).sum(-1)
    zd = x.detach().view(5, 2, tau)
    expected = (dp * p.detach())[..., None] * (2 / t) * zd.sign() * (1 - torch.sigmoid(2 * zd.abs() / t))
    torch.testing.assert_close(x.grad, expected.view(5, 2 * tau))


def test_table_gradient_is_sparse_rows_weighted_by_p():
    tables = torch.zeros(1, 4, 2, requires_grad=True)
    codes = torch.tensor([[1], [1], [3]])
    p = torch.tensor([[0.5], [0.25], [1.0]])
    dy = torch.tensor([[1.0, 2.0], [4.0, 0.0], [1.0, 1.0]])
    gather_sum(codes, p, tables, None).backward(dy)
    expected = torch.tensor([[0, 0], [0.5 * 1 + 0.25 * 4, 0.5 * 2], [0, 0], [1, 1]], dtype=torch.float32)
    torch.testing.assert_close(tables.grad[0], expected)
