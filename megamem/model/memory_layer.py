"""Memory Layer: the MemoryFormer replacement for a Linear d_in -> d_out (spec section 1).

A token's vector is cut into K = d_in / tau chunks; each chunk's sign bits pick a
row of its own table [2^tau, d_out]; the rows, weighted by p, are summed. The hash
gets no gradient: the input learns only through p. The arithmetic lives in a
kernel (megamem.kernels) handed in by whoever builds the model, so the same layer
runs on the reference, Triton or CPU path.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class MemoryLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, tau: int, kernel, temperature: float = 1.0,
                 weighting: str = "paper", bias: bool = False, init_std: float = 0.02):
        super().__init__()
        if in_features % tau:
            raise ValueError(f"Memory Layer input width {in_features} is not a multiple of tau={tau}: "
                             f"the input is cut into chunks of tau values. Use a width divisible by {tau}.")
        if weighting not in ("paper", "l1"):
            raise ValueError(f"Memory Layer weighting must be 'paper' or 'l1', got {weighting!r}")
        self.in_features, self.out_features, self.tau = in_features, out_features, tau
        self.num_chunks = in_features // tau
        self.temperature, self.weighting, self.init_std = temperature, weighting, init_std
        self.kernel = kernel
        self.observer = None        # set from outside (training statistics): called as observer(layer, codes, p)
        self.tables = nn.Parameter(torch.empty(self.num_chunks, 2**tau, out_features))   # [K, R, D]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tables, std=self.init_std)
        if self.bias is not None:
            nn.init.normal_(self.bias, std=0.001)        # the released code's bias init

    def hash(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and p of x, for layers that share one input (Q, K, V)."""
        self._check_width(x)
        codes, p = self.kernel.hash(x, self.tau, self.temperature, self.weighting)
        if self.observer is not None:
            self.observer(self, codes, p)
        return codes, p

    def forward(self, x: torch.Tensor, hashed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """y for input x; `hashed` = (codes, p) of x when another layer already hashed it.

        Shared codes go through forward, not a side method, so that module hooks
        (ZeRO-3 gathering the tables, profilers) see every lookup.
        """
        if hashed is None and self.observer is None:
            self._check_width(x)
            return self.kernel.hash_gather_sum(x, self.tables, self.bias, self.tau, self.temperature, self.weighting)
        codes, p = hashed if hashed is not None else self.hash(x)   # the observer needs the codes: unfused path
        return self.kernel.gather_sum(codes, p, self.tables, self.bias)

    def macs_per_token(self) -> int:
        """One multiply-add per retrieved element: K rows of d_out (spec section 4)."""
        return self.num_chunks * self.out_features

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Memory Layer expects inputs of width {self.in_features}, got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tau={self.tau}, K={self.num_chunks}, "
                f"weighting={self.weighting}, t={self.temperature}, bias={self.bias is not None}, kernel={self.kernel.name}")


def released_qkv_std(hidden_size: int) -> float:
    """The released code re-initialises the Q/K/V tables with std sqrt(2 / (5 d))."""
    return math.sqrt(2.0 / (5.0 * hidden_size))
