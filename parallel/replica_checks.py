"""Assertions about what the ranks of one tensor-parallel replica share.

Every rank of a tensor-parallel group must hold the same batch: the vocabulary-
parallel embedding adds the ranks' rows position by position, so different
batches would not fail, they would train on a mixture. The loader splits data by
data-parallel rank to make this so; the trainer checks it on its first batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megamem.errors import MegamemError
from megamem.parallel.state import ParallelState


def assert_same_batch(tokens: torch.Tensor, state: ParallelState) -> None:
    """Collective over the tensor-parallel group: raise unless every rank holds `tokens`' values."""
    if state.tp == 1:
        return
    flat = tokens.reshape(-1).long()
    digest = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum(),
                          flat.new_tensor(flat.numel())])
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=state.group("tp"))
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=state.group("tp"))
    if not torch.equal(low, high):
        raise MegamemError(f"the {state.tp} tensor-parallel ranks {state.ranks_of('tp')} of one replica read "
                           f"different batches; they must read the same samples. Fix: build the loader with the "
                           f"data-parallel rank and size (ParallelState.dp_rank, .dp), never the global rank")
