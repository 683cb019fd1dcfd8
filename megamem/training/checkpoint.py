"""Checkpoints: DeepSpeed's engine state plus what a resumed run needs to be exact.

Layout: RUN/checkpoints/step-00000030/ holds DeepSpeed's files (model, optimizer
partitions, LR scheduler), one RNG file per rank, and `megamem.json` (step, data
position, layout, model, and the size and sha256 of every other file). Every
file passes through CheckpointWriter, which fsyncs and hashes it; `megamem.json`
is written last, by rank 0, after every rank has reported its files, and then
the directory is fsynced: a directory without it is incomplete (a crash
mid-save) and is never resumed from, and a file that changed since is refused
at load by name. Only the newest `keep` complete checkpoints stay; an old one
loses its marker before its files, so a crash while removing it never leaves a
checkpoint that looks complete.

A write that fails (a full disk) is recorded rather than raised inside
DeepSpeed's save, so every rank still meets DeepSpeed's collectives; the ranks
then agree that the checkpoint failed, remove it, and raise CheckpointNotSaved
with what is needed. The previous checkpoint is untouched.
"""
from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megamem.durable import atomic_write, digest_problem, fsync_and_digest, fsync_directory
from megamem.errors import MegamemError
from megamem.faults import cut_short, fault_point

MARKER = "megamem.json"


# torch.save's zip writer reports a failed write (a full disk: ENOSPC, a file size limit: EFBIG) as a RuntimeError
WRITE_ERRORS = (OSError, RuntimeError)


def _reason(err: BaseException) -> str:
    return (err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0])


class CheckpointNotSaved(MegamemError):
    """A checkpoint could not be written; earlier ones are untouched."""


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


def _tensor_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(value) for value in state)
    return 0


class CheckpointWriter:
    """Stands in for DeepSpeed's checkpoint engine during a save (and writes megamem's own files)."""

    def __init__(self, inner):
        self.inner = inner
        self.files: dict[str, dict] = {}        # path -> {"bytes", "sha256"}
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
            self.files[path] = fsync_and_digest(Path(path))
        except WRITE_ERRORS as err:
            self.failure = f"writing {path} failed: {_reason(err)}"
            Path(path).unlink(missing_ok=True)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def report(self) -> dict:
        return {"files": self.files, "failure": self.failure, "attempted_bytes": self.attempted_bytes}


def _rng_state() -> dict:
    """Tensors and numbers only, so that loading needs no pickle (torch.load(weights_only=True))."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy": [int(position), int(has_gauss), float(gauss)],
            "python": torch.tensor(internal, dtype=torch.int64), "python_version": version,
            "python_gauss": gauss_next,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    position, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, run_dir: Path, step: int, extra: dict, keep: int) -> Path:
    """Collective: every rank calls it. Raises CheckpointNotSaved on every rank if any rank's write failed."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    path = root / tag
    rank = dist.get_rank()
    if rank == 0 and path.is_dir():         # an earlier attempt at this step, or a run resumed from before it
        _remove(path)
    dist.barrier()
    writer = CheckpointWriter(engine.checkpoint_engine)
    engine.checkpoint_engine = writer
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    except WRITE_ERRORS as err:         # a write DeepSpeed makes itself (its recovery script), past its collectives
        writer.failure = writer.failure or f"DeepSpeed's save failed: {_reason(err)}"
        dist.barrier()                  # the one it skipped: DeepSpeed's save ends in a barrier
    finally:
        engine.checkpoint_engine = writer.inner
    writer.write(_rng_state(), str(path / f"rng-rank{rank:05d}.pt"), torch.save)
    reports: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(reports, writer.report())
    problem = _failed_write(reports, root)
    if problem is None and rank == 0:
        files = {str(Path(name).relative_to(path)): info
                 for report in reports for name, info in report["files"].items()}
        try:
            fault_point("checkpoint-marker")
            fsync_directory(path)
            atomic_write(path / MARKER, json.dumps({"step": step, "world_size": dist.get_world_size(), **extra,
                                                    "files": files}).encode())
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


def verify_checkpoint(path: Path, marker: dict, share: int = 0, shares: int = 1) -> list[str]:
    """Problems with the files of a checkpoint (sizes and sha256 against its marker); `share` of `shares` splits
    the reading among ranks. Checkpoints from before megamem recorded files have nothing to check."""
    names = sorted(marker.get("files", {}))
    return [problem for name in names[share::shares]
            if (problem := digest_problem(path / name, marker["files"][name])) is not None]


def check_files(path: Path, marker: dict) -> None:
    """Collective: every rank reads its share of the files; any problem is refused on every rank, by file name."""
    rank, world = dist.get_rank(), dist.get_world_size()
    found: list[list[str]] = [[]] * world
    dist.all_gather_object(found, verify_checkpoint(path, marker, rank, world))
    refuse_damaged(path, [problem for share in found for problem in share])


def refuse_damaged(path: Path, problems: list[str]) -> None:
    """Raise, naming the damaged files and the checkpoint before `path` to use instead, if there are problems."""
    if not problems:
        return
    earlier = [p for p in complete_checkpoints(path.parent.parent) if p.name < path.name]
    fix = f"resume from the checkpoint before it with --resume {earlier[-1]}" if earlier \
        else "start the run again in a new run.dir"
    raise MegamemError(f"checkpoint {path} is damaged: {'; '.join(problems[:3])}"
                       f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. Fix: {fix}, after "
                       f"moving {path} aside")


def check_same_model(path: Path, marker: dict, model: dict) -> None:
    """A checkpoint of another model would fail inside DeepSpeed on a tensor shape; say which settings differ."""
    saved = marker.get("model")
    if saved is None:
        return
    differ = [key for key in sorted(set(saved) | set(model)) if key != "kernel" and saved.get(key) != model.get(key)]
    if differ:
        raise MegamemError(f"checkpoint {path} holds another model: "
                           + ", ".join(f"model.{key}={saved.get(key)!r} there, {model.get(key)!r} here"
                                       for key in differ)
                           + ". Fix: resume with the checkpoint's model settings (its run's config.yaml), or set "
                             "run.dir to a new directory")


def _sharding(layout: dict) -> str:
    """What decides which part of the parameters, optimizer state and data a rank's files hold."""
    tp, pp, tables = layout.get("tp", 1), layout.get("pp", 1), layout.get("table_sharding", "column")
    return (f"parallel.tp={tp}" + (f", parallel.table_sharding={tables}" if tp > 1 and tables else "")
            + (f", parallel.pp={pp}" if pp > 1 else "")
            + f", {layout.get('dp', 1)} data-parallel replica(s), ZeRO {layout.get('zero_stage', 0)}")


def check_same_layout(path: Path, marker: dict, layout: dict) -> None:
    """Each rank's files hold the shards of the layout that wrote them: another layout cannot load them."""
    saved, now = _sharding(marker.get("layout", {})), _sharding(layout)
    if saved != now:
        raise MegamemError(f"{path} was written with {saved}; this run has {now}, and a checkpoint's shards load only "
                           f"into the layout that wrote them. Fix: resume with {saved}, or re-cut it with `megamem "
                           f"reshard {path.parent.parent} --tp T --pp P [--set parallel.zero_stage=Z] --output "
                           f"NEW_RUN` and train NEW_RUN/config.yaml")


def load_checkpoint(engine, path: Path, marker: dict, layout: dict) -> None:
    """Restore engine state and this rank's RNG from the checkpoint `marker` (its megamem.json) describes, after
    refusing one of another layout before DeepSpeed reads it."""
    check_same_layout(path, marker, layout)
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise MegamemError(f"DeepSpeed could not load {path}. Fix: check that the run's layout and ZeRO stage match")
    rng = path / f"rng-rank{dist.get_rank():05d}.pt"
    if rng.is_file() and marker.get("world_size") == dist.get_world_size():
        try:
            _set_rng_state(torch.load(rng, weights_only=True))
        except pickle.UnpicklingError:      # an older megamem pickled them; loading pickles could run code
            print(f"megamem: warning: {rng} holds random states in an older form that megamem no longer loads "
                  f"(a pickle); they start afresh", flush=True)
