"""Memory Layer: the MemoryFormer replacement for a Linear d_in -> d_out
(docs/model.md, "The Memory Layer").

A token's vector is cut into K = d_in / tau chunks; each chunk's sign bits pick a
row of its own table [2^tau, d_out]; the rows, weighted by p, are summed. The hash
gets no gradient: the input learns only through p. The arithmetic lives in a
kernel (megamem.kernels) handed in by whoever builds the model, so the same layer
runs on the reference, Triton or CPU path.

Widths are read off the tables, never stored: a layer whose tables were replaced
by a shard (some columns of every table, or some of the tables) is a Memory Layer
of the shard's shape, which is how megamem.parallel splits it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megamem.model.init import TorchInit


class MemoryLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, tau: int, kernel, temperature: float = 1.0,
                 weighting: str = "paper", bias: bool = False, init_std: float = 0.02):
        super().__init__()
        if in_features % tau:
            raise ValueError(f"Memory Layer input width {in_features} is not a multiple of tau={tau}: "
                             f"the input is cut into chunks of tau values. Use a width divisible by {tau}.")
        if weighting not in ("paper", "l1"):
            raise ValueError(f"Memory Layer weighting must be 'paper' or 'l1', got {weighting!r}")
        self.tau, self.temperature, self.weighting, self.init_std = tau, temperature, weighting, init_std
        self.kernel = kernel
        self.observer = None    # set from outside (training statistics): observer(layer, codes, p, first_chunk)
        self.tables = nn.Parameter(torch.empty(in_features // tau, 2**tau, out_features))   # [K, R, D]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.init_weights(TorchInit)

    @property
    def num_chunks(self) -> int:
        return self.tables.shape[0]

    @property
    def in_features(self) -> int:
        return self.num_chunks * self.tau

    @property
    def out_features(self) -> int:
        return self.tables.shape[-1]

    def init_weights(self, init) -> None:
        init.normal(self.tables, self.init_std)
        if self.bias is not None:
            init.normal(self.bias, 0.001)        # the released code's bias init

    def hash(self, x: torch.Tensor, first_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and p of x, for layers that share one input (Q, K, V).

        Hashing depends on the input alone, so x may hold other chunks than the
        tables do: a tensor-parallel rank hashes the chunks its activations hold
        (`first_chunk` on, which the observer is told).
        """
        if x.shape[-1] % self.tau:
            raise ValueError(f"Memory Layer hashes chunks of {self.tau} values; an input of shape {tuple(x.shape)} "
                             f"does not split into them")
        codes, p = self.kernel.hash(x, self.tau, self.temperature, self.weighting)
        self._observe(codes, p, first_chunk)
        return codes, p

    def forward(self, x: torch.Tensor | None, hashed: tuple[torch.Tensor, torch.Tensor] | None = None,
                with_bias: bool = True) -> torch.Tensor:
        """y for input x; `hashed` = (codes, p) of x when another layer (or rank) already hashed it.

        Shared codes go through forward, not a side method, so that module hooks
        (ZeRO-3 gathering the tables, profilers) see every lookup. `with_bias=False`
        leaves the bias out, for a rank whose sum is one part of the output.
        """
        if hashed is not None:
            return self.kernel.gather_sum(*hashed, self.tables, self.bias if with_bias else None)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Memory Layer expects inputs of width {self.in_features}, got shape {tuple(x.shape)}")
        args = (x, self.tables, self.bias, self.tau, self.temperature, self.weighting)
        if self.observer is None:
            return self.kernel.hash_gather_sum(*args)
        y, codes, p = self.kernel.hash_gather_sum(*args, with_codes=True)
        self._observe(codes, p, 0)
        return y

    def _observe(self, codes: torch.Tensor, p: torch.Tensor, first_chunk: int) -> None:
        if self.observer is not None:
            self.observer(self, codes, p, first_chunk)

    def macs_per_token(self) -> int:
        """One multiply-add per retrieved element: K rows of d_out (docs/model.md, "Multiply-adds megamem counts")."""
        return self.num_chunks * self.out_features

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tau={self.tau}, K={self.num_chunks}, "
                f"weighting={self.weighting}, t={self.temperature}, bias={self.bias is not None}, "
                f"kernel={self.kernel.name}")


def released_qkv_std(hidden_size: int) -> float:
    """The released code re-initialises the Q/K/V tables with std sqrt(2 / (5 d))."""
    return math.sqrt(2.0 / (5.0 * hidden_size))
