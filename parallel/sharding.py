"""Tensor-parallel shards: cutting one out of the whole parameter, and the record checkpoints keep of it.

A shard carries `tensor_model_parallel = True` (DeepSpeed counts it on every rank
in the gradient norm; unmarked parameters on tensor-parallel rank 0 only),
`partition_dim` and `partition_stride` (Megatron's names: the dim it was cut
along and how many pieces of the whole each rank's tensor holds), and `shard`,
the indices it holds (megamem.model.init fills exactly those of the
single-process initialisation, so a model starts the same at any tp).
"""
from __future__ import annotations

import torch
from torch import nn

from megamem.checkpoint.format import ShardRecord
from megamem.model.init import Shard


def shard_parameter(module: nn.Module, name: str, dim: int, tp, stride: int = 1) -> nn.Parameter:
    """Replace `module.name` by this rank's contiguous slice of dim `dim` (of each of `stride` pieces).

    On the meta device only the shape changes; a materialised parameter keeps its values' slice.
    """
    param = getattr(module, name)
    full_shape = tuple(param.shape)
    if full_shape[dim] % (tp.size * stride):
        raise ValueError(f"{type(module).__name__}.{name} of shape {full_shape} cannot be cut into {tp.size} ranks "
                         f"x {stride} pieces along dim {dim}")
    piece = full_shape[dim] // stride
    length = piece // tp.size
    shard = Shard(full_shape, dim, tuple((i * piece + tp.rank * length, length) for i in range(stride)))
    if param.is_meta:
        local_shape = (*full_shape[:dim], length * stride, *full_shape[dim + 1:])
        local = torch.empty(local_shape, dtype=param.dtype, device="meta")
    else:
        local = param.detach().index_select(dim, torch.tensor(shard.indices(), device=param.device)).clone()
    shard_param = nn.Parameter(local, requires_grad=param.requires_grad)
    shard_param.tensor_model_parallel = True
    shard_param.partition_dim = dim
    shard_param.partition_stride = stride
    shard_param.shard = shard
    setattr(module, name, shard_param)
    return shard_param


def shard_records(module: nn.Module) -> dict[str, ShardRecord]:
    """How every shard of `module` was cut, by parameter name: what a checkpoint records to join its ranks."""
    return {name: ShardRecord(param.partition_dim, param.partition_stride)
            for name, param in module.named_parameters(remove_duplicate=False)      # a tied head under both names
            if getattr(param, "tensor_model_parallel", False)}
