"""The gradient norm of the whole model from the gradients this rank holds.

Used where every rank keeps its parameters' whole, averaged gradients (ZeRO 0;
DeepSpeed reports the norm itself for ZeRO 1-3). Pipeline stages hold disjoint
parameters, so their sums of squares add up. A tensor-parallel shard
(`tensor_model_parallel`) holds its own part of the model, so every rank counts
it; a replicated parameter holds the same gradient on every rank of its
tensor-parallel group, so only that group's first rank counts it: DeepSpeed's
own rule, which this function must agree with for the logged norm to be the one
clipping used.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megamem.parallel.state import ParallelState


def grad_norm(module: nn.Module, state: ParallelState) -> float:
    device = next(module.parameters()).device       # NCCL reduces device tensors only
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for param in module.parameters():
        if param.grad is None:
            continue
        if getattr(param, "tensor_model_parallel", False) or state.tp_rank == 0:
            squares += param.grad.detach().double().pow(2).sum()
    for kind, size in (("tp", state.tp), ("pp", state.pp)):
        if size > 1:
            dist.all_reduce(squares, group=state.group(kind))
    return squares.sqrt().item()

