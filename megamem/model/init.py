"""Parameter initialisation apart from construction, so that a model can be built on
the meta device, sharded, and only then given memory and values.

Each part of the model says how its parameters start (`init_weights(init)`); the
`init` it is handed decides where the random numbers come from:
- `TorchInit`: torch's global generator, for a part built and used on its own;
- `SeededInit`: a generator per parameter and per index along its first
  dimension, seeded by the run's seed and the parameter's name. Every row of a
  table, an embedding or a weight then gets the same values whatever else the
  model holds, so a parameter that holds a slice of the whole (a tensor-parallel
  shard, described by its `shard` attribute) is filled with exactly that slice of
  the single-process model, one row at a time: a rank never allocates the whole.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Shard:
    """Which part of the whole parameter this tensor holds: the `(start, length)` ranges of dim `dim`, in order."""

    full_shape: tuple[int, ...]
    dim: int
    ranges: tuple[tuple[int, int], ...]

    def indices(self) -> list[int]:
        return [i for start, length in self.ranges for i in range(start, start + length)]


class TorchInit:
    """torch.nn.init on the global generator."""

    @staticmethod
    def normal(param: torch.Tensor, std: float) -> None:
        if param.is_meta:       # no values to draw; torch would decompose the draw, importing torch._dynamo (~2 s)
            return
        nn.init.normal_(param, std=std)

    @staticmethod
    def zeros(param: torch.Tensor) -> None:
        nn.init.zeros_(param)

    @staticmethod
    def ones(param: torch.Tensor) -> None:
        nn.init.ones_(param)


class SeededInit(TorchInit):
    """Values that depend on (seed, parameter name, row) only; see the module docstring. Zeros and ones need no
    generator and come from TorchInit."""

    def __init__(self, model: nn.Module, seed: int):
        self.seed = seed
        self.names = {id(param): name for name, param in model.named_parameters()}

    def normal(self, param: torch.Tensor, std: float) -> None:
        shard: Shard | None = getattr(param, "shard", None)
        full_shape = shard.full_shape if shard else tuple(param.shape)
        rows = shard.indices() if shard and shard.dim == 0 else range(full_shape[0])
        columns = torch.tensor(shard.indices()) if shard and shard.dim > 0 else None
        name = self.names[id(param)]
        generator = torch.Generator(device="cpu")
        with torch.no_grad():
            for local, row in enumerate(rows):
                generator.manual_seed(self._row_seed(name, row))
                values = torch.empty(full_shape[1:], dtype=torch.float32).normal_(std=std, generator=generator)
                if columns is not None:
                    values = values.index_select(shard.dim - 1, columns)
                param[local].copy_(values)

    def _row_seed(self, name: str, row: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}/{name}/{row}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)


def init_norm(norm: nn.Module, init) -> None:
    """LayerNorm and RMSNorm (torch's or apex's) start as the identity."""
    if getattr(norm, "weight", None) is not None:
        init.ones(norm.weight)
    if getattr(norm, "bias", None) is not None:
        init.zeros(norm.bias)


def materialize(model: nn.Module, device: str | torch.device, seed: int, parts: list[nn.Module] | None = None):
    """Memory on `device` for a model built on the meta device (sharded or not), then seeded values.

    `parts` (default: the whole model) are the modules to materialise, e.g. one
    pipeline stage's; their values are drawn by their names in `model`, so a part
    starts the same whichever stage holds it. to_empty makes a new Parameter for
    every place that holds one: parameters shared by several modules (a tied
    head) are shared again, and the attributes a parameter carries (a shard's
    description, what DeepSpeed reads) are carried over.
    """
    parts = [model] if parts is None else parts
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    attributes: dict[int, dict] = {}
    for part in parts:
        for module in part.modules():
            for name, param in module.named_parameters(recurse=False):
                holders.setdefault(id(param), []).append((module, name))
                attributes[id(param)] = dict(vars(param))
    for part in parts:
        part.to_empty(device=device)
    for key, places in holders.items():
        (first, first_name), *others = places
        param = getattr(first, first_name)
        vars(param).update(attributes[key])
        for module, name in others:
            setattr(module, name, param)
    init = SeededInit(model, seed)
    for part in parts:
        if hasattr(part, "init_weights"):
            part.init_weights(init)
        else:
            init_norm(part, init)          # a norm is a part of its own (the final norm of a pipeline's last stage)
    return model
