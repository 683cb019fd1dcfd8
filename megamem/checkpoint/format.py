"""What `megamem.json`, a checkpoint's marker, holds: one typed, versioned record, one writer, one reader.

The marker is the last file of a checkpoint to be written, so its presence is
what makes a checkpoint complete (docs/checkpoints.md). It names every other
file with its size and sha256, the layout that cut the tensors, how to join the
tensor-parallel shards, the names of the optimizer's parameters in the order its
state is keyed, and the data position: enough to read any layout back into whole
tensors without building a model. A marker of another format version is refused
by name, since its fields cannot be trusted to mean the same.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megamem.durable import atomic_write
from megamem.errors import MegamemError

MARKER = "megamem.json"
FORMAT_VERSION = 1
SHARDED = "sharded"            # DeepSpeed's files of the layout that wrote them (megamem train)
UNIVERSAL = "universal"        # whole fp32 tensors under plain names, of no layout (megamem reshard)


@dataclass(frozen=True)
class Layout:
    """How a run's ranks split the model, its optimizer state and its data."""
    tp: int
    pp: int
    dp: int
    zero_stage: int
    table_sharding: str | None          # None for the dense model

    def describe(self) -> str:
        """What decides which part of the parameters, optimizer state and data a rank's files hold."""
        tables = f", parallel.table_sharding={self.table_sharding}" if self.tp > 1 and self.table_sharding else ""
        return (f"parallel.tp={self.tp}{tables}" + (f", parallel.pp={self.pp}" if self.pp > 1 else "")
                + f", {self.dp} data-parallel replica(s), ZeRO {self.zero_stage}")


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardRecord:
    """A tensor-parallel shard: each rank's tensor holds `stride` pieces along `dim` (3 for a fused Q, K, V weight
    split by heads), each the rank's slice of one piece of the whole."""
    dim: int
    stride: int


@dataclass(frozen=True)
class DataPosition:
    """Batches each data-parallel rank has consumed, and the fingerprint of the data and layout they count in."""
    batches: int
    fingerprint: str


@dataclass(frozen=True)
class Marker:
    kind: str                               # SHARDED or UNIVERSAL
    step: int                               # optimizer steps taken
    position: DataPosition
    model: dict                             # the config's model section
    layout: Layout                          # the writer's; for UNIVERSAL, the source's (its data position's)
    files: dict[str, FileRecord]            # every other file, by its path in the checkpoint directory
    world_size: int = 0                     # SHARDED: ranks that wrote it (random states are per rank)
    shards: dict[str, ShardRecord] = field(default_factory=dict)       # SHARDED: plain name -> how it was cut
    optimizer_order: list[list[list[str]]] = field(default_factory=list)   # SHARDED: per stage, groups of names
    has_optimizer: bool = False             # UNIVERSAL: whether Adam's moments were carried
    optimizer_steps: int | None = None      # UNIVERSAL: Adam's step count (its bias correction)
    source: str | None = None               # UNIVERSAL: the checkpoint it was resharded from
    version: int = FORMAT_VERSION

    @property
    def universal(self) -> bool:
        return self.kind == UNIVERSAL

    def write(self, directory: Path) -> None:
        """Atomically: a reader sees no marker or the whole of it."""
        atomic_write(directory / MARKER, json.dumps(dataclasses.asdict(self), indent=1).encode())


def is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def read_marker(directory: Path) -> Marker:
    """The marker of checkpoint `directory`, refused by name when missing, unreadable or of another version."""
    path = directory / MARKER
    if not path.is_file():
        raise MegamemError(f"{directory} is not a complete megamem checkpoint (no {MARKER}). Fix: pass a directory "
                           f"like RUN/checkpoints/step-00001000 written by megamem train or megamem reshard")
    try:
        raw = json.loads(path.read_text())
        version = raw.get("version") if isinstance(raw, dict) else None
    except (ValueError, UnicodeDecodeError) as err:
        raise MegamemError(f"{path} is not JSON ({err}): the checkpoint is damaged. Fix: resume from another "
                           f"checkpoint of the run") from None
    if version != FORMAT_VERSION:
        raise MegamemError(f"{path} is checkpoint format version {version}; this megamem reads version "
                           f"{FORMAT_VERSION} only. Fix: read it with the megamem that wrote it, or start a new run")
    try:
        return Marker(**{**raw, "position": DataPosition(**raw["position"]), "layout": Layout(**raw["layout"]),
                         "files": {name: FileRecord(**info) for name, info in raw["files"].items()},
                         "shards": {name: ShardRecord(**cut) for name, cut in raw["shards"].items()}})
    except (KeyError, TypeError) as err:
        raise MegamemError(f"{path} lacks or misnames a field ({err}): the checkpoint is damaged. Fix: resume from "
                           f"another checkpoint of the run") from None
