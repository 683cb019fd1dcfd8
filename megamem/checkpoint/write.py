"""Writing a checkpoint so that a crash at any moment leaves the previous one usable (docs/checkpoints.md).

Every file passes through CheckpointWriter, which fsyncs and hashes it; the
marker is written last, by rank 0, after every rank has reported its files, and
then the directory is fsynced: a directory without a marker is incomplete (a
crash mid-save) and is never resumed from, and a file that changed since is
refused at load by name. Only the newest `keep` complete checkpoints stay; an old
one loses its marker before its files, so a crash while removing it never leaves
a checkpoint that looks complete.

A write that fails (a full disk) is recorded rather than raised inside
DeepSpeed's save, so every rank still meets DeepSpeed's collectives; the ranks
then agree that the checkpoint failed, remove it, and raise CheckpointNotSaved
with what is needed. The previous checkpoint is untouched.
"""
from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megamem.checkpoint.catalog import checkpoint_dir, complete_checkpoints, tag_for
from megamem.checkpoint.format import MARKER, FileRecord, Marker
from megamem.checkpoint.rng import rng_file, rng_state
from megamem.durable import fsync_and_digest, fsync_directory
from megamem.errors import MegamemError
from megamem.faults import cut_short, fault_point

# torch.save's zip writer reports a failed write (a full disk: ENOSPC, a file size limit: EFBIG) as a RuntimeError
WRITE_ERRORS = (OSError, RuntimeError)


def _reason(err: BaseException) -> str:
    return (err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0])


class CheckpointNotSaved(MegamemError):
    """A checkpoint could not be written; earlier ones are untouched."""


def _tensor_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(value) for value in state)
    return 0


class CheckpointWriter:
    """Writes each file of a save, DeepSpeed's included: the engine hands it DeepSpeed's file writer as `inner`
    (megamem.training.engine), whose other methods it passes through."""

    def __init__(self):
        self.inner = None
        self.files: dict[str, FileRecord] = {}
        self.failure: str | None = None
        self.attempted_bytes = 0

    def save(self, state_dict, path: str) -> None:
        """DeepSpeed's call for each file it writes."""
        self.write(state_dict, path, self.inner.save)

    def write(self, state, path: str, save) -> None:
        self.attempted_bytes += _tensor_bytes(state)
        if self.failure is not None:            # counted, for the space it would need, but not written
            return
        try:
            fault = fault_point("checkpoint-file")
            save(state, path)
            if fault == "cut":
                cut_short(Path(path))
            self.files[path] = FileRecord(**fsync_and_digest(Path(path)))
        except WRITE_ERRORS as err:
            self.failure = f"writing {path} failed: {_reason(err)}"
            Path(path).unlink(missing_ok=True)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


SaveFiles = Callable[[Path, str, CheckpointWriter], None]    # (checkpoints dir, tag, writer): the engine's files


def save_checkpoint(save_files: SaveFiles, run_dir: Path, marker: Marker, stage: int, order: list[list[str]],
                    keep: int) -> Path:
    """Collective: every rank calls it. `marker` is what the run records (its files, world size and optimizer
    order are filled in here); `order` is this rank's optimizer groups of plain names, `stage` its pipeline stage.
    Raises CheckpointNotSaved on every rank if any rank's write failed."""
    root = checkpoint_dir(run_dir)
    path = root / tag_for(marker.step)
    rank = dist.get_rank()
    if rank == 0 and path.is_dir():         # an earlier attempt at this step, or a run resumed from before it
        _remove(path)
    dist.barrier()
    writer = CheckpointWriter()
    try:
        save_files(root, path.name, writer)
    except WRITE_ERRORS as err:         # a write DeepSpeed makes itself (its recovery script), past its collectives
        writer.failure = writer.failure or f"DeepSpeed's save failed: {_reason(err)}"
        dist.barrier()                  # the one it skipped: DeepSpeed's save ends in a barrier
    writer.write(rng_state(), str(rng_file(path, rank)), torch.save)
    reports: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(reports, {"files": writer.files, "failure": writer.failure, "stage": stage,
                                     "order": order, "attempted_bytes": writer.attempted_bytes})
    problem = _failed_write(reports, root)
    if problem is None and rank == 0:
        stages = {report["stage"]: report["order"] for report in reports}
        complete = dataclasses.replace(
            marker, world_size=len(reports), optimizer_order=[stages[s] for s in sorted(stages)],
            files={str(Path(name).relative_to(path)): info for report in reports
                   for name, info in report["files"].items()})
        try:
            fault_point("checkpoint-marker")
            fsync_directory(path)
            complete.write(path)
            fsync_directory(root)
        except OSError as err:
            problem = f"writing {path / MARKER} failed: {_reason(err)}"
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)
    problem = shared[0]
    if problem is not None:
        if rank == 0:
            _remove(path)
        dist.barrier()
        raise CheckpointNotSaved(f"checkpoint {path} was not saved: {problem}. Earlier checkpoints are untouched. "
                                 f"Fix: free space on that filesystem (or give run.dir room elsewhere)")
    if rank == 0:
        try:
            _prune(run_dir, keep)
        except OSError as err:              # the new checkpoint is complete: an old one left behind costs space only
            print(f"megamem: warning: removing old checkpoints of {run_dir} failed ({_reason(err)})", flush=True)
    dist.barrier()
    return path


def _failed_write(reports: list[dict], root: Path) -> str | None:
    failures = [report["failure"] for report in reports if report["failure"]]
    if not failures:
        return None
    needed = sum(report["attempted_bytes"] for report in reports)
    free = shutil.disk_usage(root).free
    return (f"{failures[0]}{f' (and {len(failures) - 1} more rank(s))' if len(failures) > 1 else ''}; this "
            f"checkpoint needs about {needed / 1e9:.3f} GB and {free / 1e9:.3f} GB are free on the filesystem of "
            f"{root}")


def _prune(run_dir: Path, keep: int) -> None:
    complete = complete_checkpoints(run_dir)
    newest = complete[-1]
    for path in checkpoint_dir(run_dir).glob("step-*"):
        if path.is_dir() and (path in complete[:-keep] or (path not in complete and path.name < newest.name)):
            _remove(path)


def _remove(path: Path) -> None:
    """The marker first: from then on the checkpoint is incomplete and never resumed, however far removal gets."""
    if not path.is_dir():
        return
    (path / MARKER).unlink(missing_ok=True)
    fsync_directory(path)
    for file in sorted(p for p in path.rglob("*") if not p.is_dir()):
        fault_point("checkpoint-prune")
        file.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
