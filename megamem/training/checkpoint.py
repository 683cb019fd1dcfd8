"""Checkpoints: DeepSpeed's engine state plus what a resumed run needs to be exact.

Layout: RUN/checkpoints/step-00000030/ holds DeepSpeed's files (model, optimizer
partitions, LR scheduler), one RNG file per rank, and `megamem.json` (step, data
position, config). `megamem.json` is written last, by rank 0, after every rank
has finished writing: a directory without it is incomplete (a crash mid-save)
and is never resumed from. Only the newest `keep` complete checkpoints stay.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megamem.data_tools.shards import atomic_write
from megamem.errors import MegamemError

MARKER = "megamem.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p.parent for p in checkpoint_dir(run_dir).glob(f"step-*/{MARKER}"))


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to start from: `auto` (newest complete, if any), `none`, or a checkpoint directory."""
    existing = complete_checkpoints(run_dir)
    if resume == "auto":
        return existing[-1] if existing else None
    if resume == "none":
        if existing:
            raise MegamemError(f"{run_dir} already holds checkpoints (newest: {existing[-1].name}); starting over "
                               f"would overwrite them. Fix: pass --resume auto to continue that run, or set run.dir "
                               f"to a new directory")
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise MegamemError(f"--resume {resume}: not a complete megamem checkpoint (no {MARKER}). "
                           f"Fix: pass a directory like {checkpoint_dir(run_dir)}/step-00001000, or --resume auto")
    return path


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, run_dir: Path, step: int, extra: dict, keep: int) -> Path:
    """Collective: every rank calls it."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag)
    rank = dist.get_rank()
    torch.save(_rng_state(), root / tag / f"rng-rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write(root / tag / MARKER,
                     json.dumps({"step": step, "world_size": dist.get_world_size(), **extra}).encode())
        _prune(run_dir, keep)
    dist.barrier()
    return root / tag


def _prune(run_dir: Path, keep: int) -> None:
    complete = complete_checkpoints(run_dir)
    newest = complete[-1]
    for path in checkpoint_dir(run_dir).glob("step-*"):
        if path.is_dir() and (path in complete[:-keep] or (path not in complete and path.name < newest.name)):
            shutil.rmtree(path, ignore_errors=True)


def _sharding(layout: dict) -> str:
    """What decides which part of the parameters, optimizer state and data a rank's files hold."""
    tp, pp, tables = layout.get("tp", 1), layout.get("pp", 1), layout.get("table_sharding", "column")
    return (f"parallel.tp={tp}" + (f", parallel.table_sharding={tables}" if tp > 1 and tables else "")
            + (f", parallel.pp={pp}" if pp > 1 else "")
            + f", {layout.get('dp', 1)} data-parallel replica(s), ZeRO {layout.get('zero_stage', 0)}")


def load_checkpoint(engine, path: Path, layout: dict) -> dict:
    """Restore engine state and this rank's RNG; return the marker (step, data position, ...).

    A checkpoint whose parameters were split another way is refused before DeepSpeed reads it: each rank's
    files hold the shards of the layout that wrote them.
    """
    marker = json.loads((path / MARKER).read_text())
    saved, now = _sharding(marker.get("layout", {})), _sharding(layout)
    if saved != now:
        raise MegamemError(f"{path} was written with {saved}; this run has {now}, and a checkpoint's shards load only "
                           f"into the layout that wrote them. Fix: resume with {saved}, or re-cut it with `megamem "
                           f"reshard {path.parent.parent} --tp T --pp P [--set parallel.zero_stage=Z] --output "
                           f"NEW_RUN` and train NEW_RUN/config.yaml")
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise MegamemError(f"DeepSpeed could not load {path}. Fix: check that the run's layout and ZeRO stage match")
    rng = path / f"rng-rank{dist.get_rank():05d}.pt"
    if rng.is_file() and marker.get("world_size") == dist.get_world_size():
        _set_rng_state(torch.load(rng, weights_only=False))
    return marker
