"""A MemoryFormer block under tensor parallelism, in its two table layouts.

Both take the plain block's parts (parameter names unchanged), keep the
residual sequence-parallel ([B, S/tp, d] per rank: each rank holds a contiguous
run of every sequence's positions) and run attention on whole heads.

column (the default; docs/parallel.md, "The recommended block"): every
table is split by output columns, so a rank needs only a token's codes and p:
    a = Norm1(x) on local tokens; hash; all-gather codes and p over the sequence
    Q, K, V of this rank's heads for all tokens; attention; all-to-all O back to the residual
    Norm2 on local tokens; hash; all-gather; ML1 gives this rank's W/tp columns, which are
      exactly ML2's chunks [r K/tp, (r+1) K/tp)
    Norm3 over the split width (statistics all-reduced); ML2 hashes its own chunks; all-gather
      codes and p along the chunk axis; ML2's d/tp columns; all-to-all back to the residual
Q, K and V use one gathered p, so their three partial gradients of p are added
before the one reduce-scatter that carries them back.

table (TorchRec's table-wise placement; docs/parallel.md, "The table layout"): rank r owns
whole tables, chunks [r K/tp, (r+1) K/tp) of every layer. Codes and p are routed
to each chunk's owner with an all-to-all, the owner sums its chunks' rows for all
tokens at full width, and the partial sums are reduce-scattered: to the head
owners for Q, K, V (one reduce-scatter of [S, 3, d]), to the token owners for
ML1 and ML2. Norm3 then sees whole rows of local tokens. A bias is added once,
after the reduction: Q's, K's and V's sliced by heads, ML1's and ML2's replicated.
Shapes: B batch, S sequence, K chunks, d hidden, W = (tau + expanding) K.
"""
from __future__ import annotations

import torch
from torch import nn

from megamem.model.blocks import MemoryFormerBlock
from megamem.parallel.hashed_exchange import gather_hashed, route_hashed
from megamem.parallel.mappings import SEQUENCE_DIM, TensorParallelGroup, all_to_all, reduce_scatter, replicated_grad
from megamem.parallel.norms import SplitWidthNorm, TokenNorm
from megamem.parallel.sharding import shard_parameter


class _TensorParallelMemoryFormerBlock(nn.Module):
    def __init__(self, block: MemoryFormerBlock, tp: TensorParallelGroup, p_dtype: str):
        super().__init__()
        self.tp, self.p_dtype = tp, p_dtype
        self.norm1 = TokenNorm(block.norm1, tp)
        self.q, self.k, self.v = block.q, block.k, block.v
        self.attention = block.attention
        self.norm2 = TokenNorm(block.norm2, tp)
        self.ml1 = block.ml1
        self.gelu = block.gelu
        self.ml2 = block.ml2

    # The plain block's, on the same parts under the same names (SeededInit fills the shards; norm3 is split).
    init_weights = MemoryFormerBlock.init_weights
    memory_block_middle = MemoryFormerBlock.memory_block_middle


class ColumnParallelMemoryFormerBlock(_TensorParallelMemoryFormerBlock):
    def __init__(self, block: MemoryFormerBlock, tp: TensorParallelGroup, p_dtype: str):
        super().__init__(block, tp, p_dtype)
        wide = block.ml1.out_features                       # W, before ML1 keeps W / tp of its columns
        for layer in (self.q, self.k, self.v, self.ml1, self.ml2):
            shard_parameter(layer, "tables", 2, tp)
            if layer.bias is not None:
                shard_parameter(layer, "bias", 0, tp)
        for name in ("weight", "bias"):
            if getattr(block.norm3, name, None) is not None:
                shard_parameter(block.norm3, name, 0, tp)
        self.norm3 = SplitWidthNorm(block.norm3, wide, tp)
        self.first_ml2_chunk = tp.rank * block.ml2.num_chunks // tp.size     # ML1's columns hold these chunks

    def forward(self, x_BSd: torch.Tensor) -> torch.Tensor:
        tp, p_dtype = self.tp, self.p_dtype
        hashed = gather_hashed(self.q.hash(self.norm1(x_BSd)), SEQUENCE_DIM, self.q.tau, tp, p_dtype)     # [B, S, K]
        o_BSh = self.attention(self.q(None, hashed), self.k(None, hashed), self.v(None, hashed))   # local heads
        z_BSd = x_BSd + all_to_all(o_BSh, SEQUENCE_DIM, -1, tp)
        hashed = gather_hashed(self.ml1.hash(self.norm2(z_BSd)), SEQUENCE_DIM, self.ml1.tau, tp, p_dtype)
        wide_BSw = self.memory_block_middle(self.ml1(None, hashed))                             # [B, S, W/tp]
        hashed = gather_hashed(self.ml2.hash(wide_BSw, first_chunk=self.first_ml2_chunk), -1, self.ml2.tau, tp,
                               p_dtype)
        return z_BSd + all_to_all(self.ml2(None, hashed), SEQUENCE_DIM, -1, tp)


class TableParallelMemoryFormerBlock(_TensorParallelMemoryFormerBlock):
    def __init__(self, block: MemoryFormerBlock, tp: TensorParallelGroup, p_dtype: str):
        super().__init__(block, tp, p_dtype)
        for layer in (self.q, self.k, self.v, self.ml1, self.ml2):
            shard_parameter(layer, "tables", 0, tp)
        for layer in (self.q, self.k, self.v):         # added to this rank's heads, for all tokens
            if layer.bias is not None:
                shard_parameter(layer, "bias", 0, tp)
        self.norm3 = TokenNorm(block.norm3, tp)

    def _lookup(self, layer, x: torch.Tensor) -> torch.Tensor:
        """This rank's chunks of `layer` for all tokens, hashed where the tokens live: a partial sum, full width."""
        return layer(None, route_hashed(layer.hash(x), SEQUENCE_DIM, layer.tau, self.tp, self.p_dtype), with_bias=False)

    def _biased(self, y: torch.Tensor, layer) -> torch.Tensor:
        """ML1's and ML2's bias on local tokens: replicated; Q's, K's, V's on local heads: sharded."""
        if layer.bias is None:
            return y
        return y + (layer.bias if getattr(layer.bias, "tensor_model_parallel", False)
                    else replicated_grad(layer.bias, self.tp))

    def forward(self, x_BSd: torch.Tensor) -> torch.Tensor:
        tp = self.tp
        hashed = route_hashed(self.q.hash(self.norm1(x_BSd)), SEQUENCE_DIM, self.q.tau, tp, self.p_dtype)  # K/tp
        qkv_BS3d = torch.stack([layer(None, hashed, with_bias=False) for layer in (self.q, self.k, self.v)], -2)
        heads = reduce_scatter(qkv_BS3d, -1, tp).unbind(-2)                                         # [B, S, d/tp]
        q, k, v = (self._biased(t, layer) for t, layer in zip(heads, (self.q, self.k, self.v), strict=True))
        z_BSd = x_BSd + all_to_all(self.attention(q, k, v), SEQUENCE_DIM, -1, tp)
        wide = self._biased(reduce_scatter(self._lookup(self.ml1, self.norm2(z_BSd)), SEQUENCE_DIM, tp), self.ml1)
        y_BSd = reduce_scatter(self._lookup(self.ml2, self.memory_block_middle(wide)), SEQUENCE_DIM, tp)
        return z_BSd + self._biased(y_BSd, self.ml2)
