"""A consolidated model from a run's checkpoint, loadable without DeepSpeed.

The .safetensors file holds every parameter in fp32 and, in its metadata, the
run's resolved config with its parallel layout set to one process, so
`load_exported` rebuilds the model on its own. Checkpoints of every layout are
read by megamem.training.checkpoint_reader; the vocabulary is cut back to the
single-process padding.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from megamem.errors import MegamemError
from megamem.training.checkpoint import complete_checkpoints
from megamem.training.checkpoint_reader import read_checkpoint

VOCAB_PARAMETERS = ("embed.weight", "head.weight")


def export_model(run_dir: Path, output: Path, checkpoint: Path | None = None) -> Path:
    from safetensors.torch import save

    from megamem.config import config_to_dict, load_config
    from megamem.durable import atomic_write

    checkpoint = checkpoint or newest_checkpoint(run_dir)
    single, tensors = one_process_weights(checkpoint, load_config([run_dir / "config.yaml"]))
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, save(tensors, metadata={"config": yaml.safe_dump(config_to_dict(single), sort_keys=False),
                                                 "checkpoint": str(checkpoint)}))
    return checkpoint


def one_process_weights(checkpoint: Path, config):
    """(the run's config with its layout set to one process, that model's fp32 weights) from a checkpoint of any
    layout: shards joined, the vocabulary cut back to one process's padding."""
    from megamem.config import padded_vocab_size

    state = read_checkpoint(checkpoint, config, with_optimizer=False).weights
    single = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tp=1, pp=1))
    rows = padded_vocab_size(single.model, single.parallel)
    return single, {name: (tensor[:rows] if name in VOCAB_PARAMETERS else tensor).detach().float().contiguous().clone()
                    for name, tensor in state.items()}


def newest_checkpoint(run_dir: Path) -> Path:
    complete = complete_checkpoints(run_dir)
    if not complete:
        raise MegamemError(f"{run_dir} has no complete checkpoint. Fix: point at a run directory of megamem train")
    return complete[-1]


def with_kernel(config, kernel: str | None):
    """The config with another Memory Layer kernel (None: its own)."""
    return config if kernel is None else dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                                               kernel=kernel))


def load_exported(path: str | Path, device: str = "cpu", kernel: str | None = None):
    """(model, config) from an exported .safetensors file; `kernel` as in with_kernel."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megamem.config import config_from_dict
    from megamem.model import build_model

    with safe_open(str(path), framework="pt") as handle:
        config = config_from_dict(yaml.safe_load(handle.metadata()["config"]), source=f"{path} (metadata)")
    config = with_kernel(config, kernel)
    model = build_model(config, device="meta")
    model.load_state_dict(load_file(str(path), device=device), assign=True)
    model.tie_weights()
    return model, config
