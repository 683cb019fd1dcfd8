"""A Memory Layer kernel assembled from autograd Functions, for the fused paths.

Hash (x -> codes, p) and GatherSum (codes, p, tables, bias -> y) are separate
Functions so that layers sharing codes (Q, K, V) add their gradients of p before
the input's; a path with a fused Function uses it when one layer hashes and
gathers alone. That Function also returns the codes and p it computed (no
gradient flows through them), for callers that watch bucket use.
"""
from __future__ import annotations


class AutogradKernel:
    def __init__(self, name: str, hash_function, gather_sum_function, fused_function=None):
        self.name = name
        self._hash, self._gather_sum, self._fused = hash_function, gather_sum_function, fused_function

    def hash(self, x, tau, temperature, weighting):
        return self._hash.apply(x, tau, temperature, weighting)

    def gather_sum(self, codes, p, tables, bias):
        return self._gather_sum.apply(codes, p, tables, bias)

    def hash_gather_sum(self, x, tables, bias, tau, temperature, weighting, with_codes=False):
        if self._fused is not None:
            y, codes, p = self._fused.apply(x, tables, bias, tau, temperature, weighting)
        else:
            codes, p = self.hash(x, tau, temperature, weighting)
            y = self.gather_sum(codes, p, tables, bias)
        return (y, codes, p.detach()) if with_codes else y
