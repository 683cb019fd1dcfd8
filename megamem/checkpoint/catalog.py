"""Which checkpoints a run directory holds, and which one a run resumes from.

    RUN/checkpoints/step-00001000/     one checkpoint per saved step (name order is step order)
    RUN/checkpoints/abandoned-step-N/  complete checkpoints newer than one a run resumed from

Only a checkpoint with its marker is complete (megamem.checkpoint.format); nothing
else is resumed, exported or resharded.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from megamem.checkpoint.format import MARKER, is_complete
from megamem.durable import fsync_directory
from megamem.errors import MegamemError


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p.parent for p in checkpoint_dir(run_dir).glob(f"step-*/{MARKER}"))


def newest_checkpoint(run_dir: Path) -> Path:
    complete = complete_checkpoints(run_dir)
    if not complete:
        raise MegamemError(f"{run_dir} has no complete checkpoint. Fix: point at a run directory of megamem train")
    return complete[-1]


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
    if not is_complete(path):
        raise MegamemError(f"--resume {resume}: not a complete megamem checkpoint (no {MARKER}). "
                           f"Fix: pass a directory like {checkpoint_dir(run_dir)}/step-00001000, or --resume auto")
    return path


def set_aside_newer(path: Path) -> list[Path]:
    """Resuming from `path` abandons the run's later checkpoints: renamed `abandoned-step-N` (kept, for the user to
    delete), so that neither --resume auto after a preemption nor pruning mistakes them for this run's newest."""
    moved = []
    for newer in complete_checkpoints(path.parent.parent):
        if newer.name > path.name:
            target = newer.with_name(f"abandoned-{newer.name}")
            shutil.rmtree(target, ignore_errors=True)
            newer.rename(target)
            moved.append(target)
    if moved:
        fsync_directory(path.parent)
    return moved
