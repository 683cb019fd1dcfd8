"""The gradient norm of the whole model from the gradients this rank holds, and clipping by it.

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


def clip_across_stages(engine, state: ParallelState) -> None:
    """Make a pipeline engine's fp32 ZeRO 0 clipping use the whole model's norm, and report it.

    DeepSpeed's fp32 path (`clip_fp32_gradients`, the one it calls without ZeRO or
    mixed precision) counts a replicated parameter only on rank 0 of its
    "model parallel" group, which under a pipeline spans every stage, so later
    stages' norms and biases are left out of the norm it clips by; it also keeps
    no norm for get_global_grad_norm. Its other paths (ZeRO 1, bf16, fp16) count
    per tensor-parallel rank and are right.
    """
    def clip() -> None:
        norm = grad_norm(engine.module, state)
        engine._global_grad_norm = norm
        scale = engine.gradient_clipping() / (norm + 1e-6)
        if scale < 1.0:
            for param in engine.module.parameters():
                if param.grad is not None:
                    param.grad.detach().mul_(scale)

    engine.clip_fp32_gradients = clip
