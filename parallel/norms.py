"""Norms under tensor parallelism: on a rank's own tokens, or over a width split across ranks.

`TokenNorm` normalises the tokens this rank holds (the sequence-parallel
residual); its weight is the same on every rank, so its gradient, a sum over
this rank's tokens only, is all-reduced in the graph (replicated_grad): every
engine then sees the right gradient without a hook of its own.

`SplitWidthNorm` is Norm3 of the column layout: ML1's output [S, W] is split by
columns, so the statistics over W are all-reduced, fp32 [S, 1] each (two passes
for LayerNorm: the sum, for the mean, then the centred sum of squares, as a one-process
LayerNorm computes them; one for RMSNorm), forward and, through the same
autograd all-reduce, backward (docs/parallel.md, "The recommended block", step 6). Its
weight and bias are sliced like ML1's columns.

Both take their parameters over from the plain norm, so names do not change.
The functional torch norms are used (apex's fused modules are not split-aware).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamem.parallel.mappings import TensorParallelGroup, all_reduce, replicated_grad


def _is_rms(norm: nn.Module) -> bool:
    return "RMS" in type(norm).__name__


class TokenNorm(nn.Module):
    def __init__(self, norm: nn.Module, tp: TensorParallelGroup):
        super().__init__()
        self.rms, self.eps, self.tp = _is_rms(norm), norm.eps, tp
        self.weight = norm.weight
        self.bias = None if self.rms else norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = replicated_grad(self.weight, self.tp)
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, replicated_grad(self.bias, self.tp), self.eps)


class SplitWidthNorm(TokenNorm):
    def __init__(self, norm: nn.Module, full_width: int, tp: TensorParallelGroup):
        super().__init__(norm, tp)
        self.full_width = full_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.rms:
            y = x32 * torch.rsqrt(all_reduce(x32.square().sum(-1, keepdim=True), self.tp) / self.full_width + self.eps)
            return y.to(x.dtype) * self.weight
        mean = all_reduce(x32.sum(-1, keepdim=True), self.tp) / self.full_width
        centred = x32 - mean
        variance = all_reduce(centred.square().sum(-1, keepdim=True), self.tp) / self.full_width
        y = centred * torch.rsqrt(variance + self.eps)
        return y.to(x.dtype) * self.weight + self.bias
