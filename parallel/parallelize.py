"""Tensor parallelism applied to a built plain model, from outside, in one fixed order.

    model = build_model(config, device="meta")
    loss_fn = parallelize(model, config, state)      # parts replaced by their tensor-parallel forms
    materialize(model, device, seed)                # each rank allocates and fills its shards only

Order: the embedding (vocabulary-parallel, into the sequence-parallel
residual), every block (MemoryFormer in the `parallel.table_sharding` layout,
or the dense block), the final norm (on local positions), the head
(vocabulary-parallel, after an all-gather), then the tie of embedding and head.
Parameter names do not change. The returned loss function fits the head:
vocabulary-parallel cross-entropy, or lm_loss when tp = 1 (the model is left
as it is).
"""
from __future__ import annotations

from torch import nn

from megamem.config.schema import Config
from megamem.model.blocks import MemoryFormerBlock
from megamem.model.language_model import LanguageModel, lm_loss
from megamem.parallel.dense_tp import ParallelResidualDenseBlock
from megamem.parallel.mappings import TensorParallelGroup
from megamem.parallel.memoryformer_tp import ColumnParallelMemoryFormerBlock, TableParallelMemoryFormerBlock
from megamem.parallel.norms import TokenNorm
from megamem.parallel.state import ParallelState
from megamem.parallel.vocab_parallel import VocabParallelEmbedding, VocabParallelHead, vocab_parallel_loss

MEMORYFORMER_LAYOUTS = {"column": ColumnParallelMemoryFormerBlock, "table": TableParallelMemoryFormerBlock}


def parallelize_as_rank(model: LanguageModel, config: Config, tp_rank: int) -> None:
    """Give a meta model the shapes tensor-parallel rank `tp_rank` of `config.parallel.tp` holds, without process
    groups: what megamem plan counts and what a checkpoint reader rebuilds a saved rank's parameter order from."""
    tp, pp = config.parallel.tp, config.parallel.pp
    parallelize(model, config, ParallelState(tp, pp, 1, 0, tensor_parallel=TensorParallelGroup(None, tp, tp_rank)))


def parallelize(model: LanguageModel, config: Config, state: ParallelState):
    tp = state.tensor_parallel
    par = config.parallel
    if par.tp != tp.size:
        raise ValueError(f"parallel.tp={par.tp} but this process's tensor-parallel group has {tp.size} ranks")
    if tp.size == 1:
        return lm_loss

    def block(plain: nn.Module) -> nn.Module:
        if isinstance(plain, MemoryFormerBlock):
            return MEMORYFORMER_LAYOUTS[par.table_sharding](plain, tp, par.p_dtype)
        return ParallelResidualDenseBlock(plain, tp)

    model.embed = VocabParallelEmbedding(model.embed, tp)
    model.blocks = nn.ModuleList(block(plain) for plain in model.blocks)
    model.final_norm = TokenNorm(model.final_norm, tp)
    model.head = VocabParallelHead(model.head, tp)
    model.tie_weights()
    return vocab_parallel_loss(tp)

