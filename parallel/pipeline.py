"""The model as a DeepSpeed PipelineModule, cut from the same built model as every other layout.

    model = build_model(config, device="meta")
    loss_fn = parallelize(model, config, state)          # tensor-parallel parts, as at pp = 1
    pipe = pipeline_module(model, config, state, loss_fn, device)

The layers are the plain model's own parts in order: the embedding, every block,
the final norm, the head; the loss runs on the last stage. They reach DeepSpeed
as modules on the meta device, and only this stage's are given memory and their
seeded values (megamem.model.init.materialize, by their plain names), so no rank
allocates another stage's tables and every layout starts from the same weights.
Stages are split by block type, so their table memory differs by at most one
block's; the split is megamem plan's (`blocks_per_stage`), asserted against DeepSpeed's.
What passes between stages is the residual, sequence-parallel under tp > 1: each
tensor-parallel rank sends its own positions to the same rank of the next stage
(`pipe_partitioned` off, megamem.training.deepspeed_config).

DeepSpeed builds its own grid (pipe, data, model; model fastest): the same
membership as ParallelState's tp, dp and pp groups, which megamem.training.engine
asserts (with the split DeepSpeed made), so the layers' tensor-parallel group is
the grid's slice group. Layer-numbered names map to plain ones by
megamem.parallel.pipeline_layout.plain_names.
"""
from __future__ import annotations

import torch
from torch import nn

from megamem.config.schema import Config
from megamem.deepspeed_import import import_deepspeed
from megamem.errors import MegamemError
from megamem.model.init import materialize
from megamem.model.language_model import LanguageModel
from megamem.parallel.pipeline_layout import pipeline_layers, stage_bounds
from megamem.parallel.state import ParallelState

BLOCK_TYPE = {"memoryformer": "MemoryFormerBlock", "dense": "DenseBlock"}


def pipeline_module(model: LanguageModel, config: Config, state: ParallelState, loss_fn,
                    device: torch.device) -> nn.Module:
    import_deepspeed()
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from deepspeed.runtime.utils import partition_balanced

    if config.model.tie_embeddings:
        raise ValueError("a tied embedding and head cannot be pipelined (config validation refuses it)")
    n = len(model.blocks)
    layers = pipeline_layers(model)
    bounds = stage_bounds(n, state.pp)
    deepspeed_split = [int(b) for b in partition_balanced([0, *[1] * n, 0, 0], state.pp)]
    if deepspeed_split != bounds:
        raise MegamemError(f"DeepSpeed would split the {n + 3} pipeline layers at {deepspeed_split}, megamem plan at "
                           f"{bounds}. Fix: choose parallel.pp so that each stage gets a contiguous, balanced run of "
                           f"blocks (a divisor of model.num_layers always does)")
    materialize(model, device, config.run.seed, parts=layers[bounds[state.pp_rank]:bounds[state.pp_rank + 1]])
    topology = PipeModelDataParallelTopology(num_pp=state.pp, num_mp=state.tp, num_dp=state.dp)
    return PipelineModule(layers, topology=topology, loss_fn=loss_fn,
                          partition_method=f"type:{BLOCK_TYPE[config.model.arch]}")
