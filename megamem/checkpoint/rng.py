"""Each rank's random states, saved beside DeepSpeed's files so that a resumed run draws what it would have drawn.

Stored as tensors and numbers only, so loading needs no pickle
(torch.load(weights_only=True) cannot run code).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from megamem.checkpoint.format import Marker


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng-rank{rank:05d}.pt"


def rng_state() -> dict:
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy": [int(position), int(has_gauss), float(gauss)],
            "python": torch.tensor(internal, dtype=torch.int64), "python_version": version,
            "python_gauss": gauss_next,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(checkpoint: Path, marker: Marker, rank: int, world_size: int) -> None:
    """This rank's random states, when the checkpoint was written by as many ranks (another count means other
    ranks, whose states would be someone else's)."""
    path = rng_file(checkpoint, rank)
    if marker.world_size != world_size or not path.is_file():
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    position, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
