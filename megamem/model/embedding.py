"""Token embedding and the classifier head: the model's two ends, as modules of their own.

Their tables hold the vocabulary padded to vocab_pad_multiple x tp rows
(megamem.config.padded_vocab_size) so that vocabulary-parallel ranks split them
evenly; megamem.parallel replaces each with a vocabulary-parallel module that
keeps the parameter's name. The padded rows are never looked up and never
predicted: the head returns logits of the real vocabulary only, so a model's
outputs do not depend on how much padding its layout needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamem.model.init import TorchInit


class TokenEmbedding(nn.Module):
    def __init__(self, padded_vocab_size: int, hidden_size: int, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(padded_vocab_size, hidden_size))
        self.init_weights(TorchInit)

    def init_weights(self, init) -> None:
        init.normal(self.weight, self.init_std)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens_BS, self.weight)


class LMHead(nn.Module):
    """Logits over the real vocabulary: x W[:vocab_size]^T (no bias). The only fully-connected layer of a
    MemoryFormer."""

    def __init__(self, vocab_size: int, padded_vocab_size: int, hidden_size: int, init_std: float):
        super().__init__()
        self.vocab_size, self.init_std = vocab_size, init_std
        self.weight = nn.Parameter(torch.empty(padded_vocab_size, hidden_size))
        self.init_weights(TorchInit)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def init_weights(self, init) -> None:
        init.normal(self.weight, self.init_std)

    def forward(self, x_BSd: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BSd, self.weight[: self.vocab_size])

    def macs_per_token(self) -> int:
        return self.vocab_size * self.in_features
