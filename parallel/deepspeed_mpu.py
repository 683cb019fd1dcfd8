"""The `mpu` DeepSpeed asks of a model-parallel run, answered from ParallelState (pp = 1).

DeepSpeed reads it for three things: which ranks average gradients (data
parallel), which ranks hold different parts of one model (its gradient norm sums
shards over them and counts a replicated parameter once), and checkpoint file
names (mp_rank_XX). There is deliberately no `initialize_sequence_parallel`:
with it DeepSpeed takes the group for Ulysses sequence parallelism and drops it
(docs/parallel.md, "DeepSpeed").
"""
from __future__ import annotations

from megamem.parallel.state import ParallelState


class DeepSpeedMPU:
    def __init__(self, state: ParallelState):
        if state.pp > 1:
            raise ValueError("a pipeline run hands DeepSpeed its PipelineModule's grid, not an mpu")
        self.state = state

    def get_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.state.tp

    def get_model_parallel_group(self):
        return self.state.group("tp")

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.state.ranks_of("tp")[0]

    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp

    def get_data_parallel_group(self):
        return self.state.group("dp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.state.ranks_of("dp")

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return self.state.group("pp")
