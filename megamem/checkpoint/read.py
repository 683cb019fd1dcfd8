"""A checkpoint of any layout read back as whole fp32 tensors under their plain names.

megamem train's checkpoints are DeepSpeed's files, cut by the layout that wrote
them: per tensor-parallel rank (`mp_rank_XX`), per pipeline layer
(`layer_LL-model_XX`, with the stage's mp rank being stage x tp + tensor rank),
per data-parallel rank for ZeRO's optimizer partitions. This module undoes every
cut from the files and the marker alone (no model is built), so that export,
reshard and every command that evaluates a checkpoint read every layout the same
way, and it is the one place that knows how DeepSpeed lays out its files:

- weights in fp32: the fp32 master copies of ZeRO 1/2, of bf16's optimizer and
  of the fp16 optimizer DeepSpeed steps bf16 and fp16 with at ZeRO 0 (so a
  mixed-precision run exports its master weights), ZeRO 3's through
  DeepSpeed's zero_to_fp32, the module's for fp32 without ZeRO;
- Adam's moments and step, where the checkpoint holds them in a form read here:
  ZeRO 1/2 and bf16 (flat partitions with `param_slice_mappings`) and ZeRO 0
  (torch's AdamW, keyed by the position of each parameter in its groups, whose
  names the marker records). ZeRO 3's optimizer state is kept in a form this
  reader does not take apart: `optimizer` is then None and callers say so.

Tensor-parallel shards are joined along the dims the marker's `shards` records;
the vocabulary keeps the padding of the layout that wrote it.
"""
from __future__ import annotations

import dataclasses
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from megamem.checkpoint.checks import damaged_files, refuse_damaged
from megamem.checkpoint.format import Marker, ShardRecord, read_marker
from megamem.config.schema import Config
from megamem.config.validate import padded_vocab_size
from megamem.deepspeed_import import import_deepspeed
from megamem.errors import MegamemError
from megamem.parallel.pipeline_layout import plain_names, stage_bounds

MOMENTS = ("exp_avg", "exp_avg_sq")
WEIGHTS, OPTIMIZER = "weights.safetensors", "optimizer.safetensors"      # a universal checkpoint's files
VOCAB_PARAMETERS = ("embed.weight", "head.weight")                      # padded to the layout's multiple


@dataclass
class CheckpointState:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]] | None     # {"exp_avg": {name: tensor}, "exp_avg_sq": {...}}
    optimizer_steps: int | None                                # Adam's step count (bias correction)
    marker: Marker


def read_checkpoint(checkpoint: Path, with_optimizer: bool = True) -> CheckpointState:
    marker = read_marker(checkpoint)
    refuse_damaged(checkpoint, damaged_files(checkpoint, marker))
    if marker.universal:
        return _read_universal(checkpoint, marker, with_optimizer)
    stages = [_read_stage(checkpoint, marker, stage, with_optimizer) for stage in range(marker.layout.pp)]
    weights = {}
    moments = {kind: {} for kind in MOMENTS} if all(s["moments"] is not None for s in stages) else None
    for stage in stages:
        weights.update(join_tensor_parallel(stage["weights"], marker.shards))
        if moments is not None:
            for kind in MOMENTS:
                moments[kind].update(join_tensor_parallel([rank[kind] for rank in stage["moments"]], marker.shards))
    if marker.model["tie_embeddings"]:              # one parameter; ZeRO's partitions hold it under one of its names
        weights.setdefault("head.weight", weights.get("embed.weight"))
        weights.setdefault("embed.weight", weights["head.weight"])
    return CheckpointState(weights, moments, stages[0]["steps"] if moments is not None else None, marker)


def one_process_weights(checkpoint: Path, config: Config) -> tuple[Config, dict[str, torch.Tensor]]:
    """(the run's config with its layout set to one process, that model's fp32 weights) from a checkpoint of any
    layout: shards joined, the vocabulary cut back to one process's padding."""
    weights = read_checkpoint(checkpoint, with_optimizer=False).weights
    single = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tp=1, pp=1))
    rows = padded_vocab_size(single.model, single.parallel)
    return single, {name: (tensor[:rows] if name in VOCAB_PARAMETERS else tensor).detach().float().contiguous().clone()
                    for name, tensor in weights.items()}


def _read_universal(checkpoint: Path, marker: Marker, with_optimizer: bool) -> CheckpointState:
    """A checkpoint megamem reshard wrote (whole tensors already), read the same way, e.g. to re-cut it again."""
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / WEIGHTS))
    moments = None
    if with_optimizer and marker.has_optimizer:
        saved = load_file(str(checkpoint / OPTIMIZER))
        moments = {kind: {name[len(kind) + 1:]: tensor for name, tensor in saved.items()
                          if name.startswith(f"{kind}.")} for kind in MOMENTS}
    return CheckpointState(weights, moments, marker.optimizer_steps if moments else None, marker)


def join_tensor_parallel(shards: list[dict[str, torch.Tensor]], records: dict[str, ShardRecord]) -> dict:
    """Concatenate each sharded parameter over the ranks' states in rank order, as `records` says it was cut."""
    if len(shards) == 1:
        return shards[0]
    joined = {}
    for name, tensor in shards[0].items():
        if name not in records:
            joined[name] = tensor
            continue
        dim, stride = records[name].dim, records[name].stride
        pieces = [shard[name].chunk(stride, dim) for shard in shards]
        joined[name] = torch.cat([torch.cat([rank[i] for rank in pieces], dim) for i in range(stride)], dim)
    return joined


def load_deepspeed_file(path: Path) -> dict:
    """Tensors and plain data only (no pickled code), plus the few DeepSpeed records its files hold."""
    import_deepspeed()
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


def _read_stage(checkpoint: Path, marker: Marker, stage: int, with_optimizer: bool) -> dict:
    """One pipeline stage's tensors per tensor-parallel rank, under plain names."""
    layout = marker.layout
    plain = plain_names(marker.model["num_layers"], layout.pp)
    weights, moments, steps = [], [], None
    for tp_rank in range(layout.tp):
        mp_rank = stage * layout.tp + tp_rank
        if layout.zero_stage < 3 and _partition_files(checkpoint, mp_rank):   # ZeRO 1/2, and bf16's at ZeRO 0
            fp32, rank_moments, steps = _zero_partitions(checkpoint, mp_rank, layout.dp, plain, with_optimizer)
        else:
            fp32 = _module_weights(checkpoint, marker, tp_rank, stage, plain)
            rank_moments = None
            if layout.zero_stage == 0:
                order = [name for group in marker.optimizer_order[stage] for name in group]
                masters, rank_moments, steps = _without_zero(checkpoint, mp_rank, order, with_optimizer)
                fp32.update(masters)
        weights.append(fp32)
        moments.append(rank_moments)
    return {"weights": weights, "moments": None if any(m is None for m in moments) else moments, "steps": steps}


def _module_weights(checkpoint: Path, marker: Marker, tp_rank: int, stage: int, plain) -> dict[str, torch.Tensor]:
    layout = marker.layout
    if layout.pp > 1:                      # a pipeline saves each layer's state_dict apart
        bounds = stage_bounds(marker.model["num_layers"], layout.pp)
        out = {}
        for index in range(bounds[stage], bounds[stage + 1]):
            path = checkpoint / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"
            if not path.is_file():
                raise MegamemError(f"{checkpoint} lacks {path.name} (pipeline layer {index}, tensor-parallel rank "
                                   f"{tp_rank}). Fix: use a complete checkpoint written by megamem train")
            out.update({plain(f"{index}.{name}"): tensor for name, tensor in load_deepspeed_file(path).items()})
        return out
    if layout.zero_stage < 2:
        return load_deepspeed_file(_model_file(checkpoint, tp_rank))["module"]
    import_deepspeed()
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
    shapes = load_deepspeed_file(_model_file(checkpoint, mp_rank))["param_shapes"]
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {kind: {} for kind in kinds}
    steps = None
    for path in files:
        state = load_deepspeed_file(path)["optimizer_state_dict"]
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


def _without_zero(checkpoint: Path, mp_rank: int, order: list[str], with_optimizer: bool):
    """(fp32 master weights, Adam's moments, Adam's step) of one mp rank at ZeRO 0, where the optimizer is torch's
    AdamW keyed by the position of each parameter in its groups (`order`: their plain names, as the marker
    records them); in fp16 and bf16, DeepSpeed's fp16 optimizer steps it on fp32 copies of the parameters, which
    it saves in the same order (`fp32_groups`), while the module holds them rounded. fp32: no masters (the
    module's weights are the ones trained)."""
    saved = load_deepspeed_file(_model_file(checkpoint, mp_rank))["optimizer"]
    masters = {}
    if "fp32_groups" in saved:
        masters = dict(zip(order, [copy for group in saved["fp32_groups"] for copy in group], strict=True))
        saved = saved["optimizer_state_dict"]
    positions = [index for group in saved["param_groups"] for index in group["params"]]
    if len(order) != len(positions):
        raise MegamemError(f"{checkpoint}: the optimizer state of mp rank {mp_rank} holds {len(positions)} "
                           f"parameters, its marker names {len(order)}: the checkpoint is damaged. Fix: use "
                           f"another checkpoint of the run")
    if not with_optimizer:
        return masters, None, None
    moments = {kind: {name: saved["state"][index][kind] for name, index in zip(order, positions, strict=True)}
               for kind in MOMENTS}
    return masters, moments, int(saved["state"][positions[0]]["step"])
