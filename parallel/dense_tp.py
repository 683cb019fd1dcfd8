"""The dense (Pythia / GPT-NeoX) block under tensor parallelism, Megatron style.

Column-parallel Q, K, V (the fused weight cut by heads: each rank's rows are its
heads' rows of Q, of K and of V, stride 3) and FC1; row-parallel output
projection and FC2. Pythia's residual is parallel, Y = X + Attn(Norm1(X)) +
MLP(Norm2(X)), so both branches read the same X: one all-gather of the
sequence-parallel X, both norms on all positions (their weights replicated,
gradients all-reduced), both row-parallel partial sums added, and one
reduce-scatter back to the residual. That is one all-gather and one
reduce-scatter per block forward, and their duals backward; the gathered X is
kept for backward rather than gathered again. The two output biases are
added once, after the reduction, on local positions: outside their own modules'
forward, which ZeRO-3 detects and gathers them for (seen with
stage3_param_persistence_threshold 0, so not only because they are small).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamem.model.blocks import DenseBlock
from megamem.parallel.mappings import SEQUENCE_DIM, TensorParallelGroup, all_gather, reduce_scatter, replicated_grad
from megamem.parallel.norms import TokenNorm
from megamem.parallel.sharding import shard_parameter


class RowParallelLinear(nn.Module):
    """x W^T for this rank's input columns: a partial sum. The bias (replicated) is the caller's to add once."""

    def __init__(self, linear: nn.Linear, tp: TensorParallelGroup):
        super().__init__()
        self.weight = shard_parameter(linear, "weight", 1, tp)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ParallelResidualDenseBlock(nn.Module):
    def __init__(self, block: DenseBlock, tp: TensorParallelGroup):
        super().__init__()
        self.tp, self.init_std = tp, block.init_std
        self.norm1 = TokenNorm(block.norm1, tp)
        self.qkv = block.qkv
        shard_parameter(self.qkv, "weight", 0, tp, stride=3)
        shard_parameter(self.qkv, "bias", 0, tp, stride=3)
        self.attention = block.attention
        self.out = RowParallelLinear(block.out, tp)
        self.norm2 = TokenNorm(block.norm2, tp)
        self.fc1 = block.fc1
        shard_parameter(self.fc1, "weight", 0, tp)
        shard_parameter(self.fc1, "bias", 0, tp)
        self.fc2 = RowParallelLinear(block.fc2, tp)

    init_weights = DenseBlock.init_weights       # same parts under the same names; SeededInit fills the shards

    def forward(self, x_BSd: torch.Tensor) -> torch.Tensor:
        all_BSd = all_gather(x_BSd, SEQUENCE_DIM, self.tp)
        q, k, v = self.qkv(self.norm1(all_BSd)).chunk(3, dim=-1)
        attention = self.out(self.attention(q, k, v))
        mlp = self.fc2(F.gelu(self.fc1(self.norm2(all_BSd))))
        y_BSd = reduce_scatter(attention + mlp, SEQUENCE_DIM, self.tp)
        return x_BSd + y_BSd + replicated_grad(self.out.bias, self.tp) + replicated_grad(self.fc2.bias, self.tp)
