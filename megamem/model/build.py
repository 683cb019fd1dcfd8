"""Build a model from its config section: the one place where the kernel is chosen."""
from __future__ import annotations

import torch

from megamem.config.schema import Config
from megamem.config.validate import padded_vocab_size
from megamem.kernels import get_kernel
from megamem.model.language_model import LanguageModel


def build_model(config: Config, device: str | torch.device | None = None) -> LanguageModel:
    """`device="meta"` builds shapes only: how flops and plan size MF-base without 100 GB of RAM."""
    model_cfg = config.model
    kernel = get_kernel(model_cfg.kernel) if model_cfg.arch == "memoryformer" else None
    with torch.device(device or "cpu"):
        return LanguageModel(model_cfg, padded_vocab_size(model_cfg, config.parallel), kernel)
