"""The model's two ends split over the vocabulary (docs/parallel.md, "Embedding and head").

Embedding: every rank has every token id, looks up the ids of its vocabulary
slice (zeros for the others), and the reduce-scatter both adds the slices'
rows and hands each rank its positions of the sequence-parallel residual.
Head: the final norm's output is all-gathered to all positions, each rank
computes the logits of its vocabulary slice, [B, S, V/tp], with the padded ids
set to -inf so that they are never predicted (as in the one-process head, which
leaves them out). Cross-entropy needs three fp32 all-reduces of [B, S] (max,
target logit, sum of exponentials) and none in backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamem.model.embedding import LMHead, TokenEmbedding
from megamem.parallel.mappings import SEQUENCE_DIM, TensorParallelGroup, all_gather, all_reduce_no_grad, reduce_scatter
from megamem.parallel.sharding import shard_parameter


class VocabParallelEmbedding(nn.Module):
    def __init__(self, embed: TokenEmbedding, tp: TensorParallelGroup):
        super().__init__()
        self.tp, self.init_std = tp, embed.init_std
        self.weight = shard_parameter(embed, "weight", 0, tp)
        self.rows = self.weight.shape[0]

    init_weights = TokenEmbedding.init_weights

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        local = tokens_BS - self.tp.rank * self.rows
        outside = (local < 0) | (local >= self.rows)
        rows_BSd = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter(rows_BSd, SEQUENCE_DIM, self.tp)


class VocabParallelHead(nn.Module):
    def __init__(self, head: LMHead, tp: TensorParallelGroup):
        super().__init__()
        self.tp, self.init_std, self.vocab_size = tp, head.init_std, head.vocab_size
        self.weight = shard_parameter(head, "weight", 0, tp)
        self.rows = self.weight.shape[0]

    init_weights = LMHead.init_weights

    def forward(self, x_BSd: torch.Tensor) -> torch.Tensor:
        logits_BSv = F.linear(all_gather(x_BSd, SEQUENCE_DIM, self.tp), self.weight)
        first = self.tp.rank * self.rows
        if first + self.rows > self.vocab_size:
            padded = torch.arange(first, first + self.rows, device=logits_BSv.device) >= self.vocab_size
            logits_BSv = logits_BSv.masked_fill(padded, float("-inf"))
        return logits_BSv


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_Nv, targets_N, first: int, tp: TensorParallelGroup):
        logits = logits_Nv.float()
        peak = all_reduce_no_grad(logits.max(-1).values, tp, dist.ReduceOp.MAX)
        shifted = logits - peak.unsqueeze(-1)
        local = targets_N - first
        mine = (local >= 0) & (local < logits.shape[-1])
        index = local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
        target = all_reduce_no_grad(torch.where(mine, shifted.gather(-1, index).squeeze(-1), 0.0), tp)
        exp = shifted.exp()
        total = all_reduce_no_grad(exp.sum(-1), tp)
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), index, mine)
        ctx.dtype = logits_Nv.dtype
        return (total.log() - target).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, index, mine = ctx.saved_tensors
        softmax.scatter_add_(-1, index, -mine.unsqueeze(-1).to(softmax.dtype))
        return (softmax * (grad / softmax.shape[0])).to(ctx.dtype), None, None, None


def vocab_parallel_loss(tp: TensorParallelGroup):
    """A loss_fn(logits [B, S, V/tp], targets [B, S]) -> mean cross-entropy, for the trainer."""

    def loss_fn(logits_BSv: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        first = tp.rank * logits_BSv.shape[-1]
        return _VocabParallelCrossEntropy.apply(logits_BSv.flatten(0, 1), targets_BS.flatten(), first, tp)

    return loss_fn
