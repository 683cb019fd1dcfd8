"""The layout-free checkpoint: `megamem reshard` writes one, a run of any layout resumes from it.

A DeepSpeed checkpoint is cut by the layout that wrote it (tp, pp, dp, ZeRO
stage), so a run whose allocation changes cannot load it. `megamem reshard`
reads every cut back (megamem.checkpoint.read) and writes a run directory whose
one checkpoint holds whole parameters under their plain names:

    OUT/config.yaml                                the source run's, with the new layout
    OUT/checkpoints/step-N/weights.safetensors     every parameter, fp32
    OUT/checkpoints/step-N/optimizer.safetensors   Adam's exp_avg.NAME, exp_avg_sq.NAME
    OUT/checkpoints/step-N/megamem.json            step, data position, Adam's step

Resuming from it, every rank reads just its own slices of each tensor (safetensors
reads slices lazily; `local_slice`) into its engine (megamem.training.engine).
What is not carried: each rank's random number state (the new ranks are other
ranks; megamem's training draws no random numbers after initialisation). A
source whose optimizer state cannot be read (ZeRO 3) is refused unless
--weights-only says Adam may restart, and the resumed run then says so. The LR
schedule is recomputed at the step from the new run's config.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from megamem.checkpoint.catalog import checkpoint_dir, complete_checkpoints, tag_for
from megamem.checkpoint.format import UNIVERSAL, FileRecord, Marker
from megamem.checkpoint.read import MOMENTS, OPTIMIZER, VOCAB_PARAMETERS, WEIGHTS, read_checkpoint
from megamem.config.schema import Config
from megamem.durable import atomic_write, fsync_and_digest
from megamem.errors import MegamemError
from megamem.model.init import Shard


def reshard(source: Path, target: Config, output: Path, weights_only: bool) -> Path:
    """Write `output` (a run directory for `target`, a config of the source run with another layout) from the
    checkpoint `source`; return the checkpoint written."""
    from safetensors.torch import save

    from megamem.config import save_config

    check_target(target)
    if complete_checkpoints(output):
        raise MegamemError(f"{output} already holds checkpoints; resharding into it would mix two runs. Fix: pass "
                           f"--output with a new directory")
    state = read_checkpoint(source, with_optimizer=not weights_only)
    if state.optimizer is None and not weights_only:
        raise MegamemError(f"{source} keeps Adam's state in a form megamem reshard cannot read (ZeRO stage 3); "
                           f"without it Adam's moments would restart from zero. Fix: pass --weights-only to accept "
                           f"that, or reshard a checkpoint of a ZeRO 0-2 run")
    tag = checkpoint_dir(output) / tag_for(state.marker.step)
    shutil.rmtree(tag, ignore_errors=True)              # what an interrupted reshard left (it has no marker)
    tag.mkdir(parents=True)
    save_config(dataclasses.replace(target, run=dataclasses.replace(target.run, dir=str(output))),
                output / "config.yaml")
    atomic_write(tag / WEIGHTS, save({name: tensor.float().contiguous() for name, tensor in state.weights.items()}))
    if state.optimizer is not None:
        atomic_write(tag / OPTIMIZER, save({f"{kind}.{name}": tensor.float().contiguous()
                                            for kind in MOMENTS for name, tensor in state.optimizer[kind].items()}))
    files = {name: FileRecord(**fsync_and_digest(tag / name)) for name in (WEIGHTS, OPTIMIZER)
             if (tag / name).is_file()}
    Marker(kind=UNIVERSAL, step=state.marker.step, position=state.marker.position,
           model=dataclasses.asdict(target.model), layout=state.marker.layout, files=files,
           has_optimizer=state.optimizer is not None, optimizer_steps=state.optimizer_steps,
           source=str(source)).write(tag)
    return tag


def check_target(target: Config) -> None:
    """Refuse a layout whose optimizer a resharded checkpoint cannot be written into."""
    if target.parallel.zero_stage == 0 and target.train.precision != "fp32":
        raise MegamemError(f"train.precision={target.train.precision} with parallel.zero_stage=0: DeepSpeed's "
                           f"{target.train.precision} optimizer without ZeRO keeps fp32 copies of the weights that a "
                           f"resharded checkpoint cannot be written into. Fix: --set parallel.zero_stage=1 (or 2, 3)")


def local_slice(handle, name: str, whole_shape: tuple[int, ...], shard: Shard | None,
                device: torch.device) -> torch.Tensor:
    """This rank's part of the stored whole tensor `name` (a safetensors handle's): the indices its shard records,
    or all of it. The vocabulary's padding depends on the layout: rows beyond the stored ones are zeros (no token
    reads them, and the head's logits leave them out)."""
    stored = handle.get_slice(name)
    stored_shape = tuple(stored.get_shape())
    if stored_shape[1:] != tuple(whole_shape[1:]) or (stored_shape[0] != whole_shape[0] and not name.endswith(
            VOCAB_PARAMETERS)):
        raise MegamemError(f"the resharded {name} has shape {stored_shape}, this run's model {tuple(whole_shape)}. "
                           f"Fix: train with the config.yaml megamem reshard wrote beside the checkpoint")
    dim = shard.dim if shard is not None else 0
    ranges = shard.ranges if shard is not None else ((0, whole_shape[0]),)
    pieces = []
    for start, length in ranges:
        if dim == 0:                                   # rows: clip to those stored, zeros for the rest
            have = max(0, min(length, stored_shape[0] - start))
            piece = torch.zeros((length, *whole_shape[1:]), dtype=torch.float32)
            if have:
                piece[:have] = stored[start:start + have]
        else:
            piece = stored[(slice(None),) * dim + (slice(start, start + length),)]
        pieces.append(piece)
    return torch.cat(pieces, dim).to(device)
