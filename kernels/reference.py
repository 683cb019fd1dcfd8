"""Reference Memory Layer: plain torch ops, runs on CPU and GPU, defines correctness.

Shapes: N tokens (leading dims flattened), K chunks, T = tau bits per chunk,
R = 2^tau rows per table, D = d_out. Faster kernels must agree with this file
(the equations of docs/model.md, "The Memory Layer"); its gradients come from autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_hash(x: torch.Tensor, tau: int, temperature: float, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes h(z_k) (int64, no gradient) and weights p(z_k) (differentiable), each [..., K].

    p = prod_i sigmoid(2|z_i|/t), the closed form of the softmax over all 2^tau
    sign codes, summed in log space and never below fp32 precision (float64
    inputs keep float64, which is what gradcheck needs).
    """
    z = x.unflatten(-1, (x.shape[-1] // tau, tau))                        # [..., K, T]
    powers = 1 << torch.arange(tau, device=x.device, dtype=torch.int64)
    codes = ((z >= 0).to(torch.int64) * powers).sum(-1)                   # [..., K]
    magnitude = z.abs().to(torch.promote_types(z.dtype, torch.float32))
    p = F.logsigmoid(2.0 * magnitude / temperature).sum(-1).exp()         # [..., K]
    if weighting == "l1":
        p = p * magnitude.sum(-1)
    return codes, p


def gather_sum(codes: torch.Tensor, p: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = sum_k p_k * T_k[codes_k] (+ bias): one embedding_bag over the K tables laid end to end."""
    num_tables, rows, d_out = tables.shape                                # K, R, D
    offsets = torch.arange(num_tables, device=codes.device, dtype=torch.int64) * rows
    flat_codes = codes.reshape(-1, num_tables).long() + offsets           # [N, K]; codes of any integer type
    y = F.embedding_bag(flat_codes, tables.reshape(num_tables * rows, d_out),
                        per_sample_weights=p.reshape(-1, num_tables).to(tables.dtype), mode="sum")
    if bias is not None:
        y = y + bias
    return y.reshape(*codes.shape[:-1], d_out)


class ReferenceKernel:
    """The reference path behind the Memory Layer interface (see megamem.kernels)."""

    name = "reference"
    hash = staticmethod(chunk_hash)
    gather_sum = staticmethod(gather_sum)

    @staticmethod
    def hash_gather_sum(x, tables, bias, tau, temperature, weighting, with_codes=False):
        codes, p = chunk_hash(x, tau, temperature, weighting)
        y = gather_sum(codes, p, tables, bias)
        return (y, codes, p.detach()) if with_codes else y
