"""A consolidated model from a run's checkpoint, loadable without DeepSpeed.

The .safetensors file holds every parameter in fp32 and, in its metadata, the
run's resolved config with its parallel layout set to one process, so
`load_exported` rebuilds the model on its own. Every rank's file is read:
tensor-parallel shards are joined along the dims the checkpoint's marker
records (`partitions`), ZeRO 2/3 partitions are consolidated per
tensor-parallel rank with DeepSpeed's own zero_to_fp32 reader, and the
vocabulary is cut back to the single-process padding.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
import yaml

from megamem.errors import MegamemError
from megamem.training.checkpoint import MARKER, complete_checkpoints

VOCAB_PARAMETERS = ("embed.weight", "head.weight")


def export_model(run_dir: Path, output: Path, checkpoint: Path | None = None) -> Path:
    from safetensors.torch import save_file

    from megamem.config import config_to_dict, load_config, padded_vocab_size

    checkpoint = checkpoint or _newest(run_dir)
    config = load_config([run_dir / "config.yaml"])
    marker = json.loads((checkpoint / MARKER).read_text())
    state = _consolidated_state(checkpoint, marker, config.parallel.zero_stage)
    single = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tp=1, pp=1))
    rows = padded_vocab_size(single.model, single.parallel)
    tensors = {name: (tensor[:rows] if name in VOCAB_PARAMETERS else tensor).detach().float().contiguous().clone()
               for name, tensor in state.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata={"config": yaml.safe_dump(config_to_dict(single), sort_keys=False),
                                              "checkpoint": str(checkpoint)})
    return checkpoint


def _newest(run_dir: Path) -> Path:
    complete = complete_checkpoints(run_dir)
    if not complete:
        raise MegamemError(f"{run_dir} has no complete checkpoint. Fix: point at a run directory of megamem train")
    return complete[-1]


def _consolidated_state(checkpoint: Path, marker: dict, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter at full shape, from all ranks' files of `checkpoint`."""
    tp = marker.get("layout", {}).get("tp", 1)
    shards = [_rank_state(checkpoint, rank, tp, zero_stage) for rank in range(tp)]
    return join_tensor_parallel(shards, marker.get("partitions", {}))


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


def _rank_state(checkpoint: Path, tp_rank: int, tp: int, zero_stage: int) -> dict[str, torch.Tensor]:
    pattern = f"*mp_rank_{tp_rank:02d}_model_states.pt"
    files = sorted(checkpoint.glob(pattern))
    if not files:
        raise MegamemError(f"{checkpoint} holds no DeepSpeed model states of tensor-parallel rank {tp_rank} of {tp} "
                           f"({pattern}). Fix: export a complete checkpoint written by megamem train")
    if zero_stage < 2:
        return torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:      # zero_to_fp32 reads one tensor-parallel rank's files per directory
        view = Path(tmp) / checkpoint.name
        view.mkdir()
        for path in checkpoint.glob(f"*mp_rank_{tp_rank:02d}_*states.pt"):
            (view / path.name).symlink_to(path.resolve())
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=checkpoint.name)


def load_exported(path: str | Path, device: str = "cpu"):
    """(model, config) from an exported .safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megamem.config import config_from_dict
    from megamem.model import build_model

    with safe_open(str(path), framework="pt") as handle:
        config = config_from_dict(yaml.safe_load(handle.metadata()["config"]), source=f"{path} (metadata)")
    model = build_model(config, device="meta")
    model.load_state_dict(load_file(str(path), device=device), assign=True)
    model.tie_weights()
    return model, config
