"""Decoder-only language model: embedding, blocks, final norm, classifier head.

The head is the model's only fully-connected layer in MemoryFormer. Embeddings
are untied by default, as in the released code and Pythia. The model holds no
loss: the trainer is handed one (`lm_loss` here, or megamem.parallel's
vocabulary-parallel cross-entropy when the head is split).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamem.config.schema import ModelConfig
from megamem.model.blocks import DenseBlock, MemoryFormerBlock
from megamem.model.embedding import LMHead, TokenEmbedding
from megamem.model.init import init_norm
from megamem.model.kv_cache import KVCache
from megamem.model.norms import make_norm


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, kernel=None):
        super().__init__()
        if cfg.arch == "memoryformer" and kernel is None:
            raise ValueError("a MemoryFormer needs a Memory Layer kernel, e.g. megamem.kernels.get_kernel('reference')")
        self.seq_len, self.tie_embeddings = cfg.seq_len, cfg.tie_embeddings
        self.embed = TokenEmbedding(padded_vocab_size, cfg.hidden_size, cfg.init_std)

        def block() -> nn.Module:
            return MemoryFormerBlock(cfg, kernel) if cfg.arch == "memoryformer" else DenseBlock(cfg)

        self.blocks = nn.ModuleList(block() for _ in range(cfg.num_layers))
        self.final_norm = make_norm(cfg.final_norm, cfg.hidden_size, cfg.norm_eps)
        self.head = LMHead(cfg.vocab_size, padded_vocab_size, cfg.hidden_size, cfg.init_std)
        self.tie_weights()

    def tie_weights(self) -> None:
        """The head reads the embedding's table when tied (also after a part is replaced or loaded)."""
        if self.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_weights(self, init) -> None:
        self.embed.init_weights(init)
        for block in self.blocks:
            block.init_weights(init)
        init_norm(self.final_norm, init)
        if not self.tie_embeddings:
            self.head.init_weights(init)

    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """`cache`: decoding; the tokens follow the positions it holds, and their keys and values join it."""
        length = tokens_BS.shape[-1] + (cache.length if cache is not None else 0)
        if length > self.seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds model.seq_len={self.seq_len}")
        x_BSd = self.embed(tokens_BS)
        for index, block in enumerate(self.blocks):
            x_BSd = block(x_BSd) if cache is None else block(x_BSd, cache.layers[index])
        return self.head(self.final_norm(x_BSd))


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
