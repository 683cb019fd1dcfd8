"""Checkpoints that move between layouts: `megamem reshard` writes one, `megamem train` resumes from it.

A DeepSpeed checkpoint is cut by the layout that wrote it (tp, pp, dp, ZeRO
stage), so a run whose allocation changes cannot load it. `megamem reshard`
reads every cut back (megamem.training.checkpoint_reader) and writes a run
directory whose one checkpoint holds whole parameters under their plain names:

    OUT/config.yaml                         the source run's, with the new layout
    OUT/checkpoints/step-N/weights.safetensors     every parameter, fp32
    OUT/checkpoints/step-N/optimizer.safetensors   Adam's exp_avg.NAME, exp_avg_sq.NAME
    OUT/checkpoints/step-N/megamem.json            step, data position, LR schedule, Adam's step

Resuming from it, every rank reads just its own slices of each tensor (safetensors
reads slices lazily) into its engine: parameters, fp32 master copies and Adam's
moments through DeepSpeed's tensor-fragment API where ZeRO or the bf16 optimizer
keep them, into torch's AdamW otherwise. What is not carried: each rank's random
number state (the new ranks are other ranks; megamem's training draws no random
numbers after initialisation). A source whose optimizer state cannot be read
(ZeRO 3) is refused unless --weights-only says Adam
may restart, and the resumed run then says so. The LR schedule is recomputed at the
step from the new run's config.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from megamem.config.schema import Config
from megamem.errors import MegamemError
from megamem.training.checkpoint import MARKER, checkpoint_dir, complete_checkpoints, tag_for
from megamem.training.checkpoint_reader import MOMENTS, read_checkpoint
from megamem.training.optimizer import schedule_at

FORMAT = "universal"
WEIGHTS, OPTIMIZER = "weights.safetensors", "optimizer.safetensors"


def reshard(source: Path, config: Config, target: Config, output: Path, weights_only: bool) -> Path:
    """Write `output` (a run directory for `target`, a config of the source run with another layout) from the
    checkpoint `source` of the run `config` describes; return the checkpoint written."""
    from safetensors.torch import save

    from megamem.config import save_config
    from megamem.durable import atomic_write, fsync_and_digest

    check_target(target)
    if complete_checkpoints(output):
        raise MegamemError(f"{output} already holds checkpoints; resharding into it would mix two runs. Fix: pass "
                           f"--output with a new directory")
    state = read_checkpoint(source, config, with_optimizer=not weights_only)
    if state.optimizer is None and not weights_only:
        raise MegamemError(f"{source} keeps Adam's state in a form megamem reshard cannot read (ZeRO stage 3); "
                           f"without it Adam's moments would restart from zero. Fix: pass --weights-only to accept "
                           f"that, or reshard a checkpoint of a ZeRO 0-2 run")
    step = state.marker["step"]
    tag = checkpoint_dir(output) / tag_for(step)
    shutil.rmtree(tag, ignore_errors=True)              # what an interrupted reshard left (it has no marker)
    tag.mkdir(parents=True)
    save_config(dataclasses.replace(target, run=dataclasses.replace(target.run, dir=str(output))),
                output / "config.yaml")
    atomic_write(tag / WEIGHTS, save({name: tensor.float().contiguous() for name, tensor in state.weights.items()}))
    if state.optimizer is not None:
        atomic_write(tag / OPTIMIZER, save({f"{kind}.{name}": tensor.float().contiguous()
                                            for kind in MOMENTS for name, tensor in state.optimizer[kind].items()}))
    files = {name: fsync_and_digest(tag / name) for name in (WEIGHTS, OPTIMIZER) if (tag / name).is_file()}
    marker = {"step": step, "format": FORMAT, "loader": state.marker["loader"],
              "optimizer": state.optimizer is not None, "optimizer_steps": state.optimizer_steps,
              "model": dataclasses.asdict(target.model), "files": files,
              "source": {"checkpoint": str(source), "layout": state.marker.get("layout")}}
    atomic_write(tag / MARKER, json.dumps(marker).encode())
    return tag


def is_universal(marker: dict) -> bool:
    return marker.get("format") == FORMAT


def check_target(target: Config) -> None:
    """Refuse a layout whose optimizer a resharded checkpoint cannot be written into."""
    if target.parallel.zero_stage == 0 and target.train.precision != "fp32":
        raise MegamemError(f"train.precision={target.train.precision} with parallel.zero_stage=0: DeepSpeed's "
                           f"{target.train.precision} optimizer without ZeRO keeps fp32 copies of the weights that a "
                           f"resharded checkpoint cannot be written into. Fix: --set parallel.zero_stage=1 (or 2, 3)")


def load_universal(engine, path: Path, marker: dict, rename, dp_size: int) -> None:
    """Fill this rank's engine from a resharded checkpoint (collective under ZeRO 3: every rank calls it).

    `rename` gives a parameter's plain name; `dp_size` is the number of replicas ZeRO partitions over.
    """
    from safetensors import safe_open

    torch_adam = isinstance(engine.optimizer, torch.optim.Optimizer)          # fp32 without ZeRO
    zero3 = hasattr(engine.optimizer, "fp32_partitioned_groups_flat")
    if not (torch_adam or zero3 or hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state")):
        raise MegamemError(f"{path} cannot be loaded into DeepSpeed's {type(engine.optimizer).__name__} (mixed "
                           f"precision without ZeRO). Fix: resume it with --set parallel.zero_stage=1")
    base = engine.optimizer if torch_adam else engine.optimizer.optimizer     # torch's AdamW itself
    if marker["optimizer"]:
        _create_adam_state(base, getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO 1/2 and bf16 link each parameter to its slice of Adam's flat state after their first step;
            # DeepSpeed's own universal-checkpoint loading links them the same way, before any step
            engine.optimizer._lazy_init_hp_params_optimizer_state()
    with safe_open(str(path / WEIGHTS), framework="pt") as weights:
        moments = safe_open(str(path / OPTIMIZER), framework="pt") if marker["optimizer"] else None
        for name, param in engine.module.named_parameters():
            plain = rename(name)
            if plain not in weights.keys():
                raise MegamemError(f"{path} holds no parameter {plain}: it was resharded from another model. Fix: "
                                   f"train with the config.yaml megamem reshard wrote beside it")
            if zero3 and param.ds_numel % dp_size:
                raise MegamemError(f"{plain} ({param.ds_numel} values) does not split evenly over {dp_size} ZeRO-3 "
                                   f"replicas, and DeepSpeed writes a resharded ZeRO-3 parameter only when it does. "
                                   f"Fix: resume with --set parallel.zero_stage=1 (or 2), or a data-parallel size "
                                   f"that divides it")
            value = _local_slice(weights, plain, param)
            state = {kind: _local_slice(moments, f"{kind}.{plain}", param) for kind in MOMENTS} if moments else {}
            _set_parameter(base, param, value, state, torch_adam)
    steps = marker["optimizer_steps"]
    if marker["optimizer"] and steps is not None:
        for state in base.state.values():
            if "step" in state:
                state["step"] = torch.full_like(state["step"], steps) if torch.is_tensor(state["step"]) else steps
    schedule_at(engine.lr_scheduler, engine.optimizer.param_groups, marker["step"])
    engine.global_steps = marker["step"]
    engine.global_samples = marker["step"] * engine.train_batch_size()


def _create_adam_state(base, zero3_partitions: list) -> None:
    """torch's AdamW creates its state at the first step; a resumed engine has taken none yet. ZeRO 3 hands its
    fp32 partitions to AdamW's groups only while stepping, so those are named apart."""
    for tensor in [*(t for group in base.param_groups for t in group["params"]), *zero3_partitions]:
        if not base.state.get(tensor):
            base.state[tensor] = {"step": torch.zeros((), dtype=torch.float32),
                                  **{kind: torch.zeros_like(tensor) for kind in MOMENTS}}


def _set_parameter(base, param, value: torch.Tensor, moments: dict, torch_adam: bool) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(param, "ds_id"):      # ZeRO 3: the rank holds a partition; every replica writes the same whole
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.to(param.dtype))
    else:
        param.data.copy_(value.to(param.dtype))
    if torch_adam:                              # torch's AdamW holds the parameter itself
        for kind, tensor in moments.items():
            base.state[param][kind].copy_(tensor)
    else:                                       # ZeRO 1-3 and bf16 keep fp32 masters and Adam's state apart
        safe_set_full_fp32_param(param, value.to(param.device))
        for kind, tensor in moments.items():
            safe_set_full_optimizer_state(param, tensor.to(param.device), kind)


def _local_slice(handle, name: str, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of the stored whole tensor `name`: the indices its shard records (megamem.model.init.Shard)
    or all of it. The vocabulary's padding depends on the layout: rows beyond the stored ones are zeros (no token
    reads them, and the head's logits leave them out)."""
    shard = getattr(param, "shard", None)
    stored = handle.get_slice(name)
    stored_shape = tuple(stored.get_shape())
    full_shape = shard.full_shape if shard is not None else tuple(getattr(param, "ds_shape", param.shape))
    if stored_shape[1:] != tuple(full_shape[1:]) or (stored_shape[0] != full_shape[0] and not name.endswith(
            ("embed.weight", "head.weight"))):
        raise MegamemError(f"the resharded {name} has shape {stored_shape}, this run's model {tuple(full_shape)}. "
                           f"Fix: train with the config.yaml megamem reshard wrote beside the checkpoint")
    dim = shard.dim if shard is not None else 0
    ranges = shard.ranges if shard is not None else ((0, full_shape[0]),)
    pieces = []
    for start, length in ranges:
        if dim == 0:                                   # rows: clip to those stored, zeros for the rest
            have = max(0, min(length, stored_shape[0] - start))
            piece = torch.zeros((length, *full_shape[1:]), dtype=torch.float32)
            if have:
                piece[:have] = stored[start:start + have]
        else:
            piece = stored[(slice(None),) * dim + (slice(start, start + length),)]
        pieces.append(piece)
    return torch.cat(pieces, dim).to(param.device)
