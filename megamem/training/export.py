"""A consolidated model from a run's checkpoint, loadable without DeepSpeed.

The .safetensors file holds every parameter in fp32 and, in its metadata, the
run's resolved config, so `load_exported` can rebuild the model on its own.
ZeRO 2/3 checkpoints are consolidated from their fp32 partitions with
DeepSpeed's own zero_to_fp32 reader; ZeRO 0/1 checkpoints hold the whole module.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from megamem.errors import MegamemError
from megamem.training.checkpoint import complete_checkpoints


def export_model(run_dir: Path, output: Path, checkpoint: Path | None = None) -> Path:
    from safetensors.torch import save_file

    from megamem.config import load_config

    checkpoint = checkpoint or _newest(run_dir)
    config = load_config([run_dir / "config.yaml"])
    state = _consolidated_state(checkpoint, config.parallel.zero_stage)
    tensors = {name: tensor.detach().float().contiguous().clone() for name, tensor in state.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata={"config": (run_dir / "config.yaml").read_text(), "checkpoint": str(checkpoint)})
    return checkpoint


def _newest(run_dir: Path) -> Path:
    complete = complete_checkpoints(run_dir)
    if not complete:
        raise MegamemError(f"{run_dir} has no complete checkpoint. Fix: point at a run directory of megamem train")
    return complete[-1]


def _consolidated_state(checkpoint: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage >= 2:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise MegamemError(f"{checkpoint} holds no DeepSpeed model states. Fix: export a complete checkpoint of megamem train")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def load_exported(path: str | Path, device: str = "cpu"):
    """(model, config) from an exported .safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megamem.config import config_from_dict
    from megamem.model import build_model

    with safe_open(str(path), framework="pt") as handle:
        config = config_from_dict(yaml.safe_load(handle.metadata()["config"]), source=f"{path} (metadata)")
    model = build_model(config, device=device)
    model.load_state_dict(load_file(str(path), device=device))
    return model, config
