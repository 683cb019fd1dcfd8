"""A checkpoint of any layout read back as whole parameters under their plain names.

megamem train's checkpoints are DeepSpeed's files, cut by the layout that wrote
them: per tensor-parallel rank (`mp_rank_XX`), per pipeline layer
(`layer_LL-model_XX`, with the stage's mp rank being stage x tp + tensor rank),
per data-parallel rank for ZeRO's optimizer partitions. This module undoes every
cut, so that megamem export and megamem reshard (and anything that evaluates a
checkpoint) read every layout the same way:

- weights in fp32: the fp32 master copies of ZeRO 1/2, of bf16's optimizer and
  of the fp16 optimizer DeepSpeed steps bf16 and fp16 with at ZeRO 0 (so a
  mixed-precision run exports its master weights), ZeRO 3's through
  DeepSpeed's zero_to_fp32, the module's for fp32 without ZeRO;
- Adam's moments and step, where the checkpoint holds them in a form read here:
  ZeRO 1/2 and bf16 (flat partitions with `param_slice_mappings`) and ZeRO 0
  (torch's AdamW, wrapped or not). ZeRO 3's optimizer state is kept in a form
  this reader does not take apart: `optimizer` is then None and callers say so.

Tensor-parallel shards are joined along the dims the marker's `partitions`
records; the vocabulary keeps the padding of the layout that wrote it.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megamem.config.schema import Config
from megamem.errors import MegamemError
from megamem.training.checkpoint import MARKER, refuse_damaged, verify_checkpoint

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class CheckpointState:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]] | None     # {"exp_avg": {name: tensor}, "exp_avg_sq": {...}}
    optimizer_steps: int | None                                # Adam's step count (bias correction)
    marker: dict                                               # its "layout" is the one that wrote the data position


def read_checkpoint(checkpoint: Path, config: Config, with_optimizer: bool = True) -> CheckpointState:
    if not (checkpoint / MARKER).is_file():
        raise MegamemError(f"{checkpoint} is not a complete megamem checkpoint (no {MARKER}). Fix: pass a "
                           f"directory like RUN/checkpoints/step-00001000 written by megamem train")
    marker = json.loads((checkpoint / MARKER).read_text())
    refuse_damaged(checkpoint, verify_checkpoint(checkpoint, marker))
    if marker.get("format") == "universal":
        return _read_universal(checkpoint, marker, with_optimizer)
    layout = marker.get("layout", {})
    zero = layout.get("zero_stage", config.parallel.zero_stage)
    stages = [_read_stage(checkpoint, config, layout, stage, zero, with_optimizer)
              for stage in range(layout.get("pp", 1))]
    partitions = marker.get("partitions", {})
    weights = {}
    moments = {kind: {} for kind in MOMENTS} if all(s["moments"] is not None for s in stages) else None
    for stage in stages:
        weights.update(join_tensor_parallel(stage["weights"], partitions))
        if moments is not None:
            for kind in MOMENTS:
                moments[kind].update(join_tensor_parallel([rank[kind] for rank in stage["moments"]], partitions))
    if config.model.tie_embeddings:              # one parameter; ZeRO's partitions hold it under one of its names
        weights.setdefault("head.weight", weights.get("embed.weight"))
        weights.setdefault("embed.weight", weights["head.weight"])
    return CheckpointState(weights, moments, stages[0]["steps"] if moments is not None else None, marker)


def _read_universal(checkpoint: Path, marker: dict, with_optimizer: bool) -> CheckpointState:
    """A checkpoint megamem reshard wrote (whole tensors already), read the same way, e.g. to re-cut it again."""
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "weights.safetensors"))
    moments = None
    if with_optimizer and marker["optimizer"]:
        saved = load_file(str(checkpoint / "optimizer.safetensors"))
        moments = {kind: {name[len(kind) + 1:]: tensor for name, tensor in saved.items()
                          if name.startswith(f"{kind}.")} for kind in MOMENTS}
    written_by = {**marker, "layout": (marker.get("source") or {}).get("layout") or {}}
    return CheckpointState(weights, moments, marker["optimizer_steps"] if moments else None, written_by)


def join_tensor_parallel(shards: list[dict[str, torch.Tensor]], partitions: dict[str, list[int]]) -> dict:
    """Concatenate each sharded parameter over the ranks' states in rank order.

    `partitions[name] = [dim, stride]`: each rank's tensor holds `stride` pieces
    along `dim` (3 for a fused Q, K, V weight split by heads), each the rank's
    slice of one piece of the whole.
    """
    if len(shards) == 1:
        return shards[0]
    joined = {}
    for name, tensor in shards[0].items():
        if name not in partitions:
            joined[name] = tensor
            continue
        dim, stride = partitions[name]
        pieces = [shard[name].chunk(stride, dim) for shard in shards]
        joined[name] = torch.cat([torch.cat([rank[i] for rank in pieces], dim) for i in range(stride)], dim)
    return joined


def _load(path: Path) -> dict:
    """Tensors and plain data only (no pickled code), plus the few DeepSpeed records its files hold."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")          # else DeepSpeed warns that it guessed so
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _model_file(checkpoint: Path, mp_rank: int) -> Path:
    """The model-states file of an mp rank: `mp_rank_XX_...`, or under ZeRO 3 one per data-parallel rank
    (`zero_pp_rank_D_mp_rank_XX_...`, whose non-parameter contents are the same)."""
    files = sorted(checkpoint.glob(f"*mp_rank_{mp_rank:02d}_model_states.pt"))
    if not files:
        raise MegamemError(f"{checkpoint} lacks mp_rank_{mp_rank:02d}_model_states.pt: the checkpoint is incomplete "
                           f"or was not written by megamem train. Fix: use another checkpoint of the run")
    return files[-1]


def _read_stage(checkpoint: Path, config: Config, layout: dict, stage: int, zero: int, with_optimizer: bool) -> dict:
    """One pipeline stage's tensors per tensor-parallel rank, under plain names."""
    tp, pp, dp = layout.get("tp", 1), layout.get("pp", 1), layout.get("dp", 1)
    plain = _renamer(config.model.num_layers, pp)

    weights, moments, steps = [], [], None
    for tp_rank in range(tp):
        mp_rank = stage * tp + tp_rank
        if zero < 3 and _partition_files(checkpoint, mp_rank):       # ZeRO 1/2, and bf16's optimizer at ZeRO 0
            fp32, rank_moments, steps = _zero_partitions(checkpoint, mp_rank, dp, plain, with_optimizer)
        else:
            fp32 = _module_weights(checkpoint, config, tp, tp_rank, pp, stage, zero, plain)
            rank_moments = None
            if zero == 0:
                masters, rank_moments, steps = _without_zero(checkpoint, config, tp, tp_rank, pp, stage, mp_rank,
                                                             with_optimizer)
                fp32.update(masters)
        weights.append(fp32)
        moments.append(rank_moments)
    return {"weights": weights, "moments": None if any(m is None for m in moments) else moments, "steps": steps}


def _module_weights(checkpoint: Path, config: Config, tp: int, tp_rank: int, pp: int, stage: int, zero: int,
                    plain) -> dict[str, torch.Tensor]:
    if pp > 1:                      # a pipeline saves each layer's state_dict apart
        from megamem.parallel.pipeline_layout import stage_bounds

        bounds = stage_bounds(config.model.num_layers, pp)
        out = {}
        for index in range(bounds[stage], bounds[stage + 1]):
            path = checkpoint / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"
            if not path.is_file():
                raise MegamemError(f"{checkpoint} lacks {path.name} (pipeline layer {index}, tensor-parallel rank "
                                   f"{tp_rank}). Fix: use a complete checkpoint written by megamem train")
            out.update({plain(f"{index}.{name}"): tensor for name, tensor in _load(path).items()})
        return out
    if zero < 2:
        return _load(_model_file(checkpoint, tp_rank))["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:      # zero_to_fp32 reads one tensor-parallel rank's files per directory
        view = Path(tmp) / checkpoint.name
        view.mkdir()
        for path in checkpoint.glob(f"*mp_rank_{tp_rank:02d}_*states.pt"):
            (view / path.name).symlink_to(path.resolve())
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=checkpoint.name)


def _partition_files(checkpoint: Path, mp_rank: int) -> list[Path]:
    """One mp rank's optimizer partitions (ZeRO's `zero_pp_rank_D_...`, bf16's `bf16_zero_pp_rank_D_...`), in
    data-parallel rank order."""
    files = checkpoint.glob(f"*zero_pp_rank_*_mp_rank_{mp_rank:02d}_optim_states.pt")
    return sorted(files, key=lambda path: int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1)))


def _zero_partitions(checkpoint: Path, mp_rank: int, dp: int, plain, with_optimizer: bool):
    """fp32 weights, Adam's moments and step of one mp rank, from its ZeRO 1/2 partitions over data-parallel ranks.

    Each rank's file holds, per parameter group, a flat fp32 partition, Adam's state
    for it, and `param_slice_mappings`: where each parameter's fragment lies in it.
    A parameter's fragments, in data-parallel rank order, are the parameter.
    """
    files = _partition_files(checkpoint, mp_rank)
    if len(files) != dp:
        raise MegamemError(f"{checkpoint} holds {len(files)} optimizer partitions of mp rank {mp_rank}, its layout "
                           f"{dp} (one per data-parallel replica): the checkpoint is incomplete. Fix: use another "
                           f"checkpoint of the run")
    kinds = ("fp32", *MOMENTS) if with_optimizer else ("fp32",)
    shapes = _load(_model_file(checkpoint, mp_rank))["param_shapes"]
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {kind: {} for kind in kinds}
    steps = None
    for path in files:
        state = _load(path)["optimizer_state_dict"]
        for group, mapping in enumerate(state["param_slice_mappings"]):
            flat = {"fp32": state["single_partition_of_fp32_groups"][group],
                    **{kind: state["base_optimizer_state"]["state"][group][kind] for kind in kinds[1:]}}
            steps = int(state["base_optimizer_state"]["state"][group]["step"])
            for name, fragment in mapping.items():
                for kind, tensor in flat.items():
                    pieces[kind].setdefault(name, []).append(tensor.narrow(0, fragment.start, fragment.numel))
    shape_of = {name: shape for group in shapes for name, shape in group.items()}
    whole = {kind: {plain(name): torch.cat(parts).view(shape_of[name]) for name, parts in by_name.items()}
             for kind, by_name in pieces.items()}
    return whole["fp32"], ({kind: whole[kind] for kind in MOMENTS} if with_optimizer else None), steps


def _without_zero(checkpoint: Path, config: Config, tp: int, tp_rank: int, pp: int, stage: int, mp_rank: int,
                  with_optimizer: bool):
    """(fp32 master weights, Adam's moments, Adam's step) of one mp rank at ZeRO 0, where the optimizer is torch's
    AdamW keyed by the position of each parameter in its groups; in fp16 and bf16, DeepSpeed's fp16 optimizer
    steps it on fp32 copies of the parameters, which it saves in the same order (`fp32_groups`), while the module
    holds them rounded. The positions are rebuilt from the same groups over the same modules. fp32: no masters
    (the module's weights are the ones trained)."""
    from megamem.training.optimizer import parameter_group_names

    saved = _load(_model_file(checkpoint, mp_rank))["optimizer"]
    module, plain = _source_module(config, tp, tp_rank, pp, stage)
    order = [plain(name) for group in parameter_group_names(module, config.optimizer) for name in group]
    masters = {}
    if "fp32_groups" in saved:
        masters = dict(zip(order, [copy for group in saved["fp32_groups"] for copy in group], strict=True))
        saved = saved["optimizer_state_dict"]
    positions = [index for group in saved["param_groups"] for index in group["params"]]
    if len(order) != len(positions):
        raise MegamemError(f"{checkpoint}: the optimizer state of mp rank {mp_rank} holds {len(positions)} "
                           f"parameters, the run's config builds {len(order)}. Fix: read it with the config.yaml "
                           f"of the run that wrote it")
    if not with_optimizer:
        return masters, None, None
    moments = {kind: {name: saved["state"][index][kind] for name, index in zip(order, positions, strict=True)}
               for kind in MOMENTS}
    return masters, moments, int(saved["state"][positions[0]]["step"])


def _source_module(config: Config, tp: int, tp_rank: int, pp: int, stage: int) -> tuple[nn.Module, object]:
    """The modules whose parameters the source rank's optimizer held, on the meta device, in its order."""
    import dataclasses

    from megamem.model import build_model
    from megamem.parallel.parallelize import parallelize_as_rank
    from megamem.parallel.pipeline_layout import pipeline_layers, stage_bounds

    config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tp=tp, pp=pp))
    model = build_model(config, device="meta")
    parallelize_as_rank(model, config, tp_rank)
    if pp == 1:
        return model, _renamer(len(model.blocks), pp)
    layers = pipeline_layers(model)
    bounds = stage_bounds(len(model.blocks), pp)
    return nn.ModuleDict({str(i): layers[i] for i in range(bounds[stage], bounds[stage + 1])}), \
        _renamer(len(model.blocks), pp)


def _renamer(num_layers: int, pp: int):
    """Plain names of a source layout's parameter names: a pipeline numbers its layers."""
    from megamem.parallel.pipeline_layout import layer_names, plain_name

    names = layer_names(num_layers)
    return (lambda name: name) if pp == 1 else (lambda name: plain_name(name, names))
