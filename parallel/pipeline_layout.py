"""Which blocks each pipeline stage holds.

Every MemoryFormer block has the same tables, so contiguous, balanced runs of
blocks give the stages table memory within one block's of each other
(docs/parallel.md, "Pipeline stages"); the embedding sits on the first stage and
the final norm and head on the last.
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate


def blocks_per_stage(num_layers: int, pp: int) -> list[int]:
    """The first num_layers % pp stages take one block more."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"cannot split {num_layers} blocks into {pp} pipeline stages; use 1 <= pp <= {num_layers}")
    return [num_layers // pp + (1 if stage < num_layers % pp else 0) for stage in range(pp)]


def stage_of_block(index: int, counts: list[int]) -> int:
    """The stage that holds block `index` under the split `counts`."""
    for stage, end in enumerate(accumulate(counts)):
        if index < end:
            return stage
    raise IndexError(f"block {index} is beyond the {sum(counts)} blocks of the split {counts}")


def pipeline_layers(model) -> list:
    """A built model's parts in pipeline order: the embedding, the blocks, the final norm, the head."""
    return [model.embed, *model.blocks, model.final_norm, model.head]


def layer_names(num_layers: int) -> list[str]:
    """The plain model's name of each pipeline layer, by index: the embedding, the blocks, the final norm, the head."""
    return ["embed", *(f"blocks.{i}" for i in range(num_layers)), "final_norm", "head"]


def stage_bounds(num_layers: int, pp: int) -> list[int]:
    """The pipeline layer index where each stage starts, then the end (DeepSpeed's `parts`): the embedding joins
    the first stage's blocks, the final norm and the head the last stage's."""
    starts = list(accumulate(blocks_per_stage(num_layers, pp)))[:-1]
    return [0, *(blocks + 1 for blocks in starts), num_layers + 3]


def plain_name(name: str, names: list[str]) -> str:
    """A pipeline's parameter or module name ("3.attn.q.tables", layer 3) under the plain model's ("blocks.2...");
    names not under a numbered layer (DeepSpeed's own `tied_modules`) are returned as they are."""
    index, _, rest = name.partition(".")
    if not index.isdigit():
        return name
    return f"{names[int(index)]}.{rest}" if rest else names[int(index)]


def plain_names(num_layers: int, pp: int) -> Callable[[str], str]:
    """How a layout's parameter and module names map to the plain model's: a pipeline numbers its layers, every
    other layout keeps the plain names."""
    if pp == 1:
        return str
    names = layer_names(num_layers)
    return lambda name: plain_name(name, names)
