"""What only the fused CPU path has: its two gather strategies (rows read in place for a few tokens, a
column-blocked copy of the tables for many), results that do not depend on the thread count, and the
dtypes it takes or hands to the reference."""
from __future__ import annotations

import pytest
import torch

from megamem.kernels import get_kernel
from megamem.kernels.cpu_kernel import PACKED, keep_packed
from megamem.kernels.reference import ReferenceKernel
from tests.kernels.test_fused_kernels import inputs, run

CPU = get_kernel("cpu")


@pytest.mark.parametrize("tokens", [1, 7, 255, 256, 2100, 33000])
def test_few_and_many_tokens_match_the_reference(tokens):
    """Fewer tokens than table rows read rows in place; more use the blocked copy, with a d_out that leaves the
    last column block partly empty. 33,000 tokens span three token tiles of 16,384 in the backward and two per
    thread in the forward with two threads."""
    x, tables, bias, dy = inputs(tokens, 8, 5, 70, torch.float32, seed=tokens)
    ours = run(CPU, x, tables, bias, 8, 1.0, "paper", dy)
    ref = run(ReferenceKernel, x, tables, bias, 8, 1.0, "paper", dy)
    for name, a, b in zip(("y", "dx", "dtables", "dbias"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("tokens", [1, 3, 600])
def test_results_do_not_depend_on_the_thread_count(tokens):
    """Every sum has one owner and a fixed order, so one thread and two give the same bits: with many tokens
    (blocked copy) and with few, whose columns two threads split (rows read in place)."""
    x, tables, bias, dy = inputs(tokens, 8, 6, 40, torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(CPU, x, tables, bias, 8, 1.0, "paper", dy)
        torch.set_num_threads(2)
        two = run(CPU, x, tables, bias, 8, 1.0, "paper", dy)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("y", "dx", "dtables", "dbias"), one, two, strict=True):
        assert torch.equal(a, b), name


def test_codes_of_another_kernel_are_accepted():
    """Q, K and V gather with codes hashed once; those may come from the reference (int64)."""
    x, tables, bias, _ = inputs(300, 8, 4, 24, torch.float32)
    codes, p = ReferenceKernel.hash(x, 8, 1.0, "paper")
    torch.testing.assert_close(CPU.gather_sum(codes, p, tables, bias),
                               ReferenceKernel.gather_sum(codes, p, tables, bias))


def test_float64_is_refused_by_name_and_auto_takes_the_reference():
    x, tables, bias, _ = inputs(40, 4, 3, 8, torch.float64)
    with pytest.raises(RuntimeError, match="float32, bfloat16, float16.*model.kernel=reference"):
        CPU.hash_gather_sum(x, tables, bias, 4, 1.0, "paper")
    auto = get_kernel("auto").hash_gather_sum(x, tables, bias, 4, 1.0, "paper")
    assert auto.dtype == torch.float64
    torch.testing.assert_close(auto, ReferenceKernel.hash_gather_sum(x, tables, bias, 4, 1.0, "paper"))


def test_float16_matches_an_fp32_reference_to_float16_precision():
    """float16 in and out, float32 inside: the error is that of rounding results to float16 (2^-11 relative)."""
    x, tables, bias, dy = inputs(400, 8, 4, 40, torch.float16)
    ours = run(CPU, x, tables, bias, 8, 1.0, "paper", dy)
    exact = run(ReferenceKernel, x.float(), tables.float(), bias.float(), 8, 1.0, "paper", dy)
    for name, a, b in zip(("y", "dx", "dtables", "dbias"), ours, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=2**-9, atol=2**-9 * b.abs().max().item(), msg=name)


def test_an_empty_batch_gives_empty_outputs_and_zero_table_gradients():
    x, tables, _, _ = inputs(0, 8, 2, 8, torch.float32)
    x, tables = x.reshape(2, 0, 16).requires_grad_(), tables.requires_grad_()
    y = CPU.hash_gather_sum(x, tables, None, 8, 1.0, "paper")
    y.sum().backward()
    assert y.shape == (2, 0, 8) and x.grad.shape == x.shape and torch.equal(tables.grad, torch.zeros_like(tables))


@pytest.mark.parametrize("tau, weighting", [(8, "paper"), (8, "l1"), (10, "paper"), (5, "l1"), (12, "paper")])
def test_chunks_are_hashed_eight_at_once_with_a_short_last_group(tau, weighting):
    """11 chunks: one group of eight (tau = 8 paper: a transpose of eight vectors; otherwise a strided gather)
    and a last group of three, each checked against the reference; zeros of both signs count as >= 0."""
    x, _, _, _ = inputs(50, tau, 11, 8, torch.float32, seed=3)
    x[0, :tau], x[1, 3], x[2, 8 * tau + 5] = -0.0, 0.0, -0.0
    codes, p = CPU.hash(x, tau, 1.0, weighting)
    ref_codes, ref_p = ReferenceKernel.hash(x, tau, 1.0, weighting)
    assert torch.equal(codes.long(), ref_codes.long()) and codes[0, 0] == 2**tau - 1
    torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=0)


def test_kept_packed_tables_give_the_same_bits_and_follow_every_change():
    """A marked table is packed once, that copy is reused while the table is unchanged, and it is made again
    after an in-place update (an optimizer step) or for new storage; a call that reads rows in place packs
    nothing. Outputs are bit for bit those of packing on every call."""
    x, tables, bias, _ = inputs(700, 8, 4, 40, torch.float32, seed=2)

    def y(x, tables):
        return CPU.hash_gather_sum(x, tables, bias, 8, 1.0, "l1")

    marked = tables.clone()
    keep_packed(marked)
    y(x[:3], marked)
    assert getattr(marked, PACKED) is None
    assert torch.equal(y(x, marked), y(x, tables))
    packed = getattr(marked, PACKED)[1]
    y(x, marked)
    assert getattr(marked, PACKED)[1] is packed
    with torch.no_grad():
        marked.mul_(-2.0)
        tables.mul_(-2.0)
    assert torch.equal(y(x, marked), y(x, tables))
    assert getattr(marked, PACKED)[1] is not packed
    marked.data = tables.clone() + 1.0
    assert torch.equal(y(x, marked), y(x, tables + 1.0))


def test_without_autograd_the_kernel_runs_outside_autograd_with_the_same_results():
    """Evaluation and decoding skip Function.apply: the same bits, and outputs that record no graph."""
    x, tables, bias, _ = inputs(5, 8, 4, 40, torch.float32, seed=3)
    tables.requires_grad_()
    recorded = CPU.hash_gather_sum(x, tables, bias, 8, 1.0, "l1")
    with torch.no_grad():
        plain = CPU.hash_gather_sum(x, tables, bias, 8, 1.0, "l1")
        codes, p = CPU.hash(x, 8, 1.0, "l1")
    assert recorded.grad_fn is not None and plain.grad_fn is None and torch.equal(recorded.detach(), plain)
    assert torch.equal(CPU.gather_sum(codes, p, tables, bias).detach(), plain)
