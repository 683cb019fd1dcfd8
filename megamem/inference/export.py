"""A consolidated model from a run's checkpoint, loadable without DeepSpeed.

The .safetensors file holds every parameter in fp32 and, in its metadata, the
run's resolved config with its parallel layout set to one process, so
`load_exported` rebuilds the model on its own. Checkpoints of every layout are
read by megamem.checkpoint.read; the vocabulary is cut back to the
single-process padding.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from megamem.checkpoint.catalog import newest_checkpoint
from megamem.checkpoint.read import one_process_weights
from megamem.config import config_from_dict, config_to_dict, load_config
from megamem.durable import atomic_write
from megamem.model import build_model


def export_model(run_dir: Path, output: Path, checkpoint: Path | None = None) -> Path:
    from safetensors.torch import save

    checkpoint = checkpoint or newest_checkpoint(run_dir)
    single, tensors = one_process_weights(checkpoint, load_config([run_dir / "config.yaml"]))
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, save(tensors, metadata={"config": yaml.safe_dump(config_to_dict(single), sort_keys=False),
                                                 "checkpoint": str(checkpoint)}))
    return checkpoint


def with_kernel(config, kernel: str | None):
    """The config with another Memory Layer kernel (None: its own)."""
    return config if kernel is None else dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                                               kernel=kernel))


def load_exported(path: str | Path, device: str = "cpu", kernel: str | None = None):
    """(model, config) from an exported .safetensors file; `kernel` as in with_kernel."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        config = config_from_dict(yaml.safe_load(handle.metadata()["config"]), source=f"{path} (metadata)")
    config = with_kernel(config, kernel)
    model = build_model(config, device="meta")
    model.load_state_dict(load_file(str(path), device=device), assign=True)
    model.tie_weights()
    return model, config
