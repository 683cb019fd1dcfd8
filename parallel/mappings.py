"""Every collective of tensor parallelism, as autograd Functions that count their bytes.

Each forward has its dual as backward (docs/parallel.md, "What each collective moves"):
  all_gather      <-> reduce_scatter       (codes and p out to the ranks that look up; grad p back)
  all_to_all      <-> the reverse all_to_all (heads-sharded <-> sequence-sharded activations)
  replicated_grad: identity <-> all_reduce (a weight every rank holds, used on its own tokens)
  all_reduce      <-> all_reduce           (Norm3's statistics over a width split across ranks)
  plus the three plain all-reduces of vocabulary-parallel cross-entropy.
On a group of one each is the identity and moves nothing.

Byte counts are what this rank *receives* in the usual ring algorithms, the
measure docs/parallel.md uses: an all-gather receives the other ranks'
parts, (tp-1)/tp of its output; a reduce-scatter and an all-to-all (tp-1)/tp of
their input; an all-reduce twice that. gloo builds reduce-scatter from
all-reduces, so counting is arithmetic, never timing.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1        # of the [B, S, ...] tensors the tensor-parallel blocks exchange


@dataclass
class ByteCounter:
    """Bytes received, per (collective kind, 'forward' | 'backward'). Activation checkpointing replays forward
    collectives during backward; they count as forward again."""

    received: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, direction: str, nbytes: int) -> None:
        self.received[(kind, direction)] += nbytes

    def total(self, direction: str) -> int:
        return sum(n for (_, way), n in self.received.items() if way == direction)

    def reset(self) -> None:
        self.received.clear()


@dataclass
class TensorParallelGroup:
    """The process group of one tensor-parallel replica, this rank's place in it, and its byte counter."""

    group: object
    size: int
    rank: int
    counter: ByteCounter = field(default_factory=ByteCounter)

    @classmethod
    def single(cls) -> TensorParallelGroup:
        return cls(None, 1, 0)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def gather_tensor(x: torch.Tensor, dim: int, tp: TensorParallelGroup, direction: str) -> torch.Tensor:
    """The plain all-gather along `dim`, counted under `direction`: for Functions that own their backward."""
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((tp.size * x0.shape[0], *x0.shape[1:]))
    dist.all_gather_into_tensor(out, x0, group=tp.group)
    tp.counter.add("all_gather", direction, _nbytes(out) - _nbytes(x0))
    return out.movedim(0, dim).contiguous()


def reduce_scatter_tensor(x: torch.Tensor, dim: int, tp: TensorParallelGroup, direction: str) -> torch.Tensor:
    """The plain reduce-scatter (sum) along `dim`, counted under `direction`."""
    if x.shape[dim] % tp.size:
        raise ValueError(f"cannot reduce-scatter {tuple(x.shape)} along dim {dim} over {tp.size} ranks")
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((x0.shape[0] // tp.size, *x0.shape[1:]))
    dist.reduce_scatter_tensor(out, x0, group=tp.group)
    tp.counter.add("reduce_scatter", direction, _nbytes(x0) - _nbytes(out))
    return out.movedim(0, dim).contiguous()


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, tp: TensorParallelGroup,
                direction: str) -> torch.Tensor:
    if x.shape[scatter_dim] % tp.size:
        raise ValueError(f"cannot scatter {tuple(x.shape)} along dim {scatter_dim} over {tp.size} ranks")
    send = torch.stack(x.chunk(tp.size, scatter_dim)).contiguous()       # [tp, ...piece], piece j to rank j
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=tp.group)
    tp.counter.add("all_to_all", direction, _nbytes(send) - _nbytes(send[0]))
    return torch.cat(received.unbind(0), gather_dim)


def _all_reduce(x: torch.Tensor, tp: TensorParallelGroup, direction: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, op=op, group=tp.group)
    tp.counter.add("all_reduce", direction, 2 * (_nbytes(x) - _nbytes(x) // tp.size))
    return x


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tp):
        ctx.dim, ctx.tp = dim, tp
        return gather_tensor(x, dim, tp, "forward")

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_tensor(grad, ctx.dim, ctx.tp, "backward"), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tp):
        ctx.dim, ctx.tp = dim, tp
        return reduce_scatter_tensor(x, dim, tp, "forward")

    @staticmethod
    def backward(ctx, grad):
        return gather_tensor(grad, ctx.dim, ctx.tp, "backward"), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, tp):
        ctx.dims, ctx.tp = (scatter_dim, gather_dim), tp
        return _all_to_all(x, scatter_dim, gather_dim, tp, "forward")

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.tp, "backward"), None, None, None


class _ReplicatedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, tp):
        ctx.tp = tp
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.tp, "backward"), None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_reduce(x.clone(), tp, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.tp, "backward"), None


def all_gather(x: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
    """Concatenate every rank's x along `dim` (rank order); backward: reduce-scatter the gradient."""
    return x if tp.size == 1 else _AllGather.apply(x, dim, tp)


def reduce_scatter(x: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's slice of `dim`; backward: all-gather."""
    return x if tp.size == 1 else _ReduceScatter.apply(x, dim, tp)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, tp: TensorParallelGroup) -> torch.Tensor:
    """Slice `scatter_dim` into tp pieces, piece j to rank j; concatenate what arrives along `gather_dim`."""
    return x if tp.size == 1 else _AllToAll.apply(x, scatter_dim, gather_dim, tp)


def replicated_grad(weight: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """The weight itself; its gradient, a partial sum over this rank's tokens, is summed over the group."""
    return weight if tp.size == 1 or weight is None else _ReplicatedGrad.apply(weight, tp)


def all_reduce(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    """Sum over the ranks, forward and backward (statistics over a width split across ranks)."""
    return x if tp.size == 1 else _AllReduce.apply(x, tp)


def all_reduce_no_grad(x: torch.Tensor, tp: TensorParallelGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A plain all-reduce, counted as forward traffic (inside a Function that owns its own backward)."""
    return x if tp.size == 1 else _all_reduce(x, tp, "forward", op)
