"""The fused kernels (C++ on CPU, Triton compiled on a GPU or in its interpreter without one) against the
reference: outputs and every gradient, fp32, bf16 and fp16, the worst case for the table-gradient reduction,
determinism, and a whole model. Triton runs the block sizes it ships with (64 tokens x 64 columns), so the shapes
span several blocks each way: d_out of 3 column blocks and more, token counts that are not a multiple of 64,
K not a power of two, and ML2's 10-bit codes."""
from __future__ import annotations

import pytest
import torch

from megamem.kernels import get_kernel
from megamem.kernels.reference import ReferenceKernel
from megamem.model import build_model, lm_loss

FUSED = ["cpu", "triton"]


def device_for(kernel) -> torch.device:
    """Triton compiles for CUDA tensors where a GPU is present (scripts/gpu_check.sh); its interpreter takes CPU
    tensors."""
    return torch.device("cuda" if kernel.name == "triton" and torch.cuda.is_available() else "cpu")


def run(kernel, x, tables, bias, tau, temperature, weighting, dy):
    """(y, dx, dtables, dbias) on the CPU, in fp32, computed on the kernel's device."""
    device = device_for(kernel)
    x, tables = x.detach().to(device).requires_grad_(), tables.detach().to(device).requires_grad_()
    bias = bias.detach().to(device).requires_grad_() if bias is not None else None
    y = kernel.hash_gather_sum(x, tables, bias, tau, temperature, weighting)
    y.backward(dy.to(device, y.dtype))
    return tuple(t.detach().float().cpu() if t is not None else None
                 for t in (y, x.grad, tables.grad, bias.grad if bias is not None else None))


def inputs(tokens, tau, chunks, d_out, dtype, seed=0, one_bucket=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, chunks * tau, generator=g)
    if one_bucket:
        x = x.abs() + 0.1                                  # every chunk of every token hashes to the last row
    tables = torch.randn(chunks, 2**tau, d_out, generator=g) * 0.02
    bias = torch.randn(d_out, generator=g) * 0.01
    dy = torch.randn(tokens, d_out, generator=g)
    return x.to(dtype), tables.to(dtype), bias.to(dtype), dy


@pytest.mark.parametrize("kernel", FUSED)
@pytest.mark.parametrize("tau, chunks, d_out", [(4, 5, 130), (8, 6, 150), (10, 3, 200)])
@pytest.mark.parametrize("weighting", ["paper", "l1"])
def test_fp32_matches_the_reference(kernel, tau, chunks, d_out, weighting):
    """fp32 both ways; only summation order differs (float sums of K terms): 1e-5 relative to the values' scale."""
    x, tables, bias, dy = inputs(300, tau, chunks, d_out, torch.float32)
    temperature = 0.8 if weighting == "paper" else 1.0
    ours = run(get_kernel(kernel), x, tables, bias, tau, temperature, weighting, dy)
    ref = run(ReferenceKernel, x, tables, bias, tau, temperature, weighting, dy)
    for name, a, b in zip(("y", "dx", "dtables", "dbias"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("kernel", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_matches_an_fp32_reference_to_its_precision(kernel, dtype):
    """bf16 or fp16 inputs, fp32 accumulation inside: the error is that of rounding results to 16 bits (2^-8
    relative for bf16, 2^-11 for fp16; 2^-7 allowed)."""
    x, tables, bias, dy = inputs(200, 10, 3, 150, dtype)
    ours = run(get_kernel(kernel), x, tables, bias, 10, 1.0, "paper", dy)
    exact = run(ReferenceKernel, x.float(), tables.float(), bias.float(), 10, 1.0, "paper", dy)
    for name, a, b in zip(("y", "dx", "dtables", "dbias"), ours, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("kernel", FUSED)
def test_every_token_in_one_bucket(kernel):
    """The worst case for the table-gradient reduction: 1,000 contributions to one row per table."""
    x, tables, bias, dy = inputs(1000, 8, 3, 40, torch.float32, one_bucket=True)
    ours = run(get_kernel(kernel), x, tables, None, 8, 1.0, "paper", dy)
    ref = run(ReferenceKernel, x, tables, None, 8, 1.0, "paper", dy)
    assert (ours[2][:, :-1] == 0).all() and ours[2][:, -1].abs().sum() > 0
    for a, b in zip(ours[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("kernel", [
    "cpu", pytest.param("triton", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=(
        "compiled Triton only: the interpreter runs one program after another, so two runs could not differ; "
        "test_triton_table_gradients_are_sums_in_token_order checks the order that makes them equal")))])
def test_table_gradients_are_bit_identical_run_to_run(kernel):
    x, tables, bias, dy = inputs(512, 8, 5, 150, torch.float32, seed=3)
    first, second = (run(get_kernel(kernel), x, tables, bias, 8, 1.0, "paper", dy)[2] for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's order, to the bit: compiled, Triton fuses "
                                                      "the multiply-add")
def test_triton_table_gradients_are_sums_in_token_order():
    """Why Triton's table gradients are the same run to run: every row's contributions are added one at a time in
    token order, in fp32, whichever program or thread takes them; here to the bit against that sum written out."""
    x, tables, _, dy = inputs(300, 10, 3, 150, torch.float32, seed=6)
    tables.requires_grad_()
    y, codes, p = get_kernel("triton").hash_gather_sum(x, tables, None, 10, 1.0, "paper", with_codes=True)
    y.backward(dy)
    keys = codes.long() + torch.arange(3) * 1024                       # [N, K]: each token's row of each table
    expected = torch.zeros(3 * 1024, 150)
    for token in range(300):
        expected[keys[token]] += p[token][:, None] * dy[token]
    assert torch.equal(tables.grad.reshape(-1, 150), expected)


def test_triton_atomic_table_gradients_agree_with_the_segment_reduction(monkeypatch):
    from megamem.kernels import triton_kernel as module

    triton_kernel = get_kernel("triton")
    x, tables, bias, dy = inputs(256, 8, 3, 40, torch.float32, seed=4)
    segments = run(triton_kernel, x, tables, bias, 8, 1.0, "paper", dy)
    monkeypatch.setattr(module, "ATOMIC_TABLE_GRADIENTS", True)
    atomic = run(triton_kernel, x, tables, bias, 8, 1.0, "paper", dy)
    torch.testing.assert_close(atomic[2], segments[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_a_model_on_a_fused_kernel_matches_the_reference_model(tiny_config, kernel):
    """Q, K and V share one hashing: the gradient of p from three lookups must add up the same way.
    Without expanding bits ML2 has 2^8, not 2^10, rows per table: a quarter of the interpreter's work."""
    tiny_config.model.expanding_bits = 0
    tiny_config.model.kernel = "reference"
    torch.manual_seed(0)
    reference = build_model(tiny_config)
    tiny_config.model.kernel = kernel
    fused = build_model(tiny_config)
    fused.load_state_dict(reference.state_dict())
    assert fused.blocks[0].q.kernel is get_kernel(kernel)
    device = device_for(get_kernel(kernel))
    fused.to(device)
    tokens = torch.randint(0, 97, (2, 33))
    losses = [lm_loss(m(t[:, :-1]), t[:, 1:]) for m, t in ((reference, tokens), (fused, tokens.to(device)))]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1].cpu(), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(reference.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad.cpu(), rtol=1e-4, atol=1e-4 * a.grad.abs().max().item() + 1e-9,
                                   msg=name)
