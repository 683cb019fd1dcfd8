"""A Memory Layer kernel assembled from autograd Functions, for the fused paths.

Hash (x -> codes, p) and GatherSum (codes, p, tables, bias -> y) are separate
Functions so that layers sharing codes (Q, K, V) add their gradients of p before
the input's; a path with a fused Function uses it when one layer hashes and
gathers alone. That Function also returns the codes and p it computed (no
gradient flows through them), for callers that watch bucket use.

With autograd off (evaluation, decoding), a Function that offers `compute` (its
forward without the bookkeeping) is called through that: for one token,
Function.apply costs as much as the CPU lookup itself (about 13 us).
"""
from __future__ import annotations

import torch


class AutogradKernel:
    def __init__(self, name: str, hash_function, gather_sum_function, fused_function=None):
        self.name = name
        self._hash, self._gather_sum, self._fused = hash_function, gather_sum_function, fused_function

    def hash(self, x, tau, temperature, weighting):
        return _call(self._hash, x, tau, temperature, weighting)

    def gather_sum(self, codes, p, tables, bias):
        return _call(self._gather_sum, codes, p, tables, bias)

    def hash_gather_sum(self, x, tables, bias, tau, temperature, weighting, with_codes=False):
        if self._fused is not None:
            y, codes, p = _call(self._fused, x, tables, bias, tau, temperature, weighting)
        else:
            codes, p = self.hash(x, tau, temperature, weighting)
            y = self.gather_sum(codes, p, tables, bias)
        return (y, codes, p.detach()) if with_codes else y


def _call(function, *args):
    if torch.is_grad_enabled() or not hasattr(function, "compute"):
        return function.apply(*args)
    return function.compute(*args)
