"""Every parallel degree and rank of this process, and its process groups.

One object built once and passed to whoever needs it; nothing reads a global
group. Ranks are laid out tensor-parallel fastest, then data-parallel, then
pipeline (as Megatron does), so a tensor-parallel group is a run of adjacent
ranks, which on a cluster means one node.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megamem.errors import MegamemError
from megamem.parallel.mappings import TensorParallelGroup


@dataclass
class ParallelState:
    tp: int
    pp: int
    dp: int
    rank: int
    groups: dict = field(default_factory=dict, repr=False)
    tensor_parallel: TensorParallelGroup = field(default_factory=TensorParallelGroup.single, repr=False)

    @classmethod
    def for_world(cls, tp: int, pp: int, world_size: int, rank: int) -> ParallelState:
        if world_size % (tp * pp):
            raise MegamemError(f"{world_size} processes cannot host tp={tp} x pp={pp} = {tp * pp} ranks per replica; "
                               f"use a multiple of {tp * pp} processes")
        return cls(tp, pp, world_size // (tp * pp), rank)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def ranks_of(self, kind: str, rank: int | None = None) -> list[int]:
        """The global ranks of `rank`'s group of `kind` ('tp', 'dp' or 'pp')."""
        rank = self.rank if rank is None else rank
        tp_rank, dp_rank, pp_rank = rank % self.tp, rank // self.tp % self.dp, rank // (self.tp * self.dp)

        def place(t, d, p):
            return (p * self.dp + d) * self.tp + t

        if kind == "tp":
            return [place(t, dp_rank, pp_rank) for t in range(self.tp)]
        if kind == "dp":
            return [place(tp_rank, d, pp_rank) for d in range(self.dp)]
        if kind == "pp":
            return [place(tp_rank, dp_rank, p) for p in range(self.pp)]
        raise ValueError(f"unknown group kind {kind!r}; use tp, dp or pp")

    def build_groups(self) -> None:
        """Create the tp, dp and pp groups. Collective: every rank must call it, in the same order."""
        for kind in ("tp", "dp", "pp"):
            seen = {}
            for rank in range(self.world_size):
                members = tuple(self.ranks_of(kind, rank))
                if members not in seen:
                    seen[members] = dist.new_group(list(members))
            self.groups[kind] = seen[tuple(self.ranks_of(kind))]
        self.tensor_parallel = TensorParallelGroup(self.groups["tp"], self.tp, self.tp_rank)

    def group(self, kind: str):
        if kind not in self.groups:
            raise RuntimeError("process groups not built: call ParallelState.build_groups() after init_process_group")
        return self.groups[kind]
