"""What `megamem train` checks before any rank starts, and every rank again: the layout, the run directory and the
data. Nothing here imports torch, so `megamem train --nproc N` refuses a mistake, or starts its ranks, at once."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from megamem.errors import MegamemError


def check_layout(config, world_size: int) -> int:
    """Refuse, before any process group forms, a layout this trainer cannot run; return the data-parallel size."""
    from megamem.config import validate_world

    if config.train.precision == "fp16":         # DeepSpeed's accelerator (GPU, or CPU without fp16) decides
        from megamem.deepspeed_import import import_deepspeed

        if not import_deepspeed().accelerator.get_accelerator().is_fp16_supported():
            raise MegamemError("train.precision=fp16: DeepSpeed has no fp16 on this CPU. Fix: use train.precision=bf16 "
                               "or fp32 on CPU (fp16 with dynamic loss scaling runs on GPUs)")
    return validate_world(config, world_size)


def check_run_dir(run_dir: Path) -> None:
    """An unwritable run.dir fails here, before training, not at the first checkpoint hours later."""
    probe = run_dir / "checkpoints" / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise MegamemError(f"run.dir={run_dir} is not writable ({err.strerror or err}: {err.filename or probe}). "
                           f"Fix: set run.dir to a directory this user can write, or fix its permissions") from None


def open_training_data(config):
    """The run's data spec and checked manifests: a missing or mismatched dataset fails here, before training."""
    from megamem.data_tools.shards import DataSpec, open_datasets

    spec = DataSpec.from_config(config.data, config.model)
    return spec, open_datasets(spec)
