"""Build a model from its config: the one place where the kernel is chosen."""
from __future__ import annotations

import torch

from megamem.config.schema import Config
from megamem.config.validate import padded_vocab_size
from megamem.kernels import get_kernel
from megamem.model.init import materialize
from megamem.model.language_model import LanguageModel


def build_model(config: Config, device: str | torch.device | None = None) -> LanguageModel:
    """The model, initialised from run.seed on `device` (default CPU).

    `device="meta"` builds shapes only: how flops and plan size MF-base without
    100 GB of RAM, and how training builds a model to shard before it exists
    (megamem.model.init.materialize gives it memory and values afterwards).
    """
    model_cfg = config.model
    kernel = get_kernel(model_cfg.kernel) if model_cfg.arch == "memoryformer" else None
    with torch.device("meta"):
        model = LanguageModel(model_cfg, padded_vocab_size(model_cfg, config.parallel), kernel)
    if torch.device(device or "cpu").type == "meta":
        return model
    return materialize(model, device or "cpu", config.run.seed)
