"""Decoder-only language model: embedding, blocks, final norm, Linear head.

The head is the model's only fully-connected layer in MemoryFormer. Embeddings
are untied by default, as in the released code and Pythia. `vocab_size` here is
already padded (megamem.config.padded_vocab_size) so vocabulary-parallel
sharding splits evenly; padded rows are never targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamem.config.schema import ModelConfig
from megamem.model.blocks import DenseBlock, MemoryFormerBlock
from megamem.model.norms import make_norm


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, kernel=None):
        super().__init__()
        if cfg.arch == "memoryformer" and kernel is None:
            raise ValueError("a MemoryFormer needs a Memory Layer kernel, e.g. megamem.kernels.get_kernel('reference')")
        self.seq_len = cfg.seq_len
        self.embed = nn.Embedding(vocab_size, cfg.hidden_size)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)

        def block() -> nn.Module:
            return MemoryFormerBlock(cfg, kernel) if cfg.arch == "memoryformer" else DenseBlock(cfg)

        self.blocks = nn.ModuleList(block() for _ in range(cfg.num_layers))
        self.final_norm = make_norm(cfg.final_norm, cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.init_std)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        if tokens_BS.shape[-1] > self.seq_len:
            raise ValueError(f"sequence of {tokens_BS.shape[-1]} tokens exceeds model.seq_len={self.seq_len}")
        x_BSd = self.embed(tokens_BS)
        for block in self.blocks:
            x_BSd = block(x_BSd)
        return self.head(self.final_norm(x_BSd))


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
