"""What makes a checkpoint usable by a run: intact files, the same model, and a layout that can load it.

Each check runs before DeepSpeed reads a file, so a refusal names the setting or
the file and the fix instead of failing inside DeepSpeed on a tensor shape.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megamem.checkpoint.catalog import complete_checkpoints
from megamem.checkpoint.format import Layout, Marker
from megamem.durable import digest_problem
from megamem.errors import MegamemError


def damaged_files(path: Path, marker: Marker, share: int = 0, shares: int = 1) -> list[str]:
    """Problems with the files of a checkpoint (sizes and sha256 against its marker); `share` of `shares` splits
    the reading among ranks."""
    names = sorted(marker.files)
    return [problem for name in names[share::shares]
            if (problem := digest_problem(path / name, vars(marker.files[name]))) is not None]


def check_files(path: Path, marker: Marker) -> None:
    """Collective: every rank reads its share of the files; any problem is refused on every rank, by file name."""
    rank, world = dist.get_rank(), dist.get_world_size()
    found: list[list[str]] = [[]] * world
    dist.all_gather_object(found, damaged_files(path, marker, rank, world))
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


def check_same_model(path: Path, marker: Marker, model: dict) -> None:
    """A checkpoint of another model would fail inside DeepSpeed on a tensor shape; say which settings differ (the
    Memory Layer kernel computes the same model and may change)."""
    saved = marker.model
    differ = [key for key in sorted(set(saved) | set(model)) if key != "kernel" and saved.get(key) != model.get(key)]
    if differ:
        raise MegamemError(f"checkpoint {path} holds another model: "
                           + ", ".join(f"model.{key}={saved.get(key)!r} there, {model.get(key)!r} here"
                                       for key in differ)
                           + ". Fix: resume with the checkpoint's model settings (its run's config.yaml), or set "
                             "run.dir to a new directory")


def check_same_layout(path: Path, marker: Marker, layout: Layout) -> None:
    """Each rank's files hold the shards of the layout that wrote them: another layout cannot load them. A
    universal checkpoint has no layout and loads into any."""
    if marker.universal:
        return
    saved, now = marker.layout.describe(), layout.describe()
    if saved != now:
        raise MegamemError(f"{path} was written with {saved}; this run has {now}, and a checkpoint's shards load only "
                           f"into the layout that wrote them. Fix: resume with {saved}, or re-cut it with `megamem "
                           f"reshard {path.parent.parent} --tp T --pp P [--set parallel.zero_stage=Z] --output "
                           f"NEW_RUN` and train NEW_RUN/config.yaml")


def check_resumable(path: Path, marker: Marker, model: dict, layout: Layout) -> None:
    """Refuse a checkpoint of another model or layout before the run writes anything into its directory (its
    config.yaml stays the one that wrote the checkpoint)."""
    check_same_model(path, marker, model)
    check_same_layout(path, marker, layout)
