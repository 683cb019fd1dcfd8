"""A trained model from whatever a user points at: a run directory, one of its checkpoints, or an export.

Every command that uses a trained model goes through load_trained, so each reads
checkpoints of every layout the trainer writes (tensor- and pipeline-parallel
shards, ZeRO partitions, resharded ones) in the same way, through
megamem.checkpoint.read, into the one-process model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megamem.checkpoint.catalog import newest_checkpoint
from megamem.checkpoint.format import MARKER, is_complete
from megamem.checkpoint.read import one_process_weights
from megamem.config import load_config
from megamem.config.schema import Config
from megamem.errors import MegamemError
from megamem.inference.export import load_exported, with_kernel
from megamem.kernels.cpu_kernel import keep_packed
from megamem.model import build_model
from megamem.model.memory_layer import MemoryLayer


@dataclass
class TrainedModel:
    model: nn.Module          # in eval mode, on the device asked for
    config: Config            # the run's, with its layout set to one process
    source: Path              # the checkpoint or exported file the weights came from


def load_trained(path: str | Path, device: str | torch.device = "cpu", kernel: str | None = None) -> TrainedModel:
    """`kernel`: the Memory Layer kernel to run with instead of the run's model.kernel (megamem.kernels)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        model, config = load_exported(path, str(device), kernel)
        return TrainedModel(for_inference(model), config, path)
    if is_complete(path):
        checkpoint, run_dir = path, path.parent.parent
    elif (path / "config.yaml").is_file():
        checkpoint, run_dir = newest_checkpoint(path), path
    else:
        raise MegamemError(f"{path} is not a run directory (config.yaml, checkpoints/), a checkpoint (a directory "
                           f"with {MARKER}) or a file of megamem export. Fix: pass one of those")
    if not (run_dir / "config.yaml").is_file():
        raise MegamemError(f"checkpoint {checkpoint} is not inside its run directory ({run_dir / 'config.yaml'} is "
                           f"missing). Fix: pass the checkpoint where megamem train wrote it, or its run directory")
    config, weights = one_process_weights(checkpoint, load_config([run_dir / "config.yaml"]))
    config = with_kernel(config, kernel)
    model = build_model(config, device="meta")
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    return TrainedModel(for_inference(model.to(device)), config, checkpoint)


def for_inference(model: nn.Module) -> nn.Module:
    """In eval mode, with its Memory Layer tables marked for the CPU kernel's kept packed copy."""
    keep_packed_tables(model)
    return model.eval()


def keep_packed_tables(model: nn.Module, keep: bool = True) -> None:
    """Marks every Memory Layer table of `model` for the CPU kernel's kept packed copy, or unmarks them
    (megamem.kernels.cpu_kernel: the copy costs as much memory as the tables, and saves packing per call)."""
    for module in model.modules():
        if isinstance(module, MemoryLayer):
            keep_packed(module.tables, keep)
