"""Loss, perplexity and bits per token and per byte of a trained model on a dataset.

Bits per byte divide the summed loss (in bits) by the bytes of text the target
tokens stand for (the tokenizer's count per id), so that models with different
tokenizers compare. The validation split is read in the trainer's order and
batches (megamem.data_tools.loader.valid_batches), so a run's own validation
split gives the valid_loss it logged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megamem.errors import MegamemError


@dataclass
class Evaluation:
    loss: float                 # mean next-token cross-entropy, nats
    perplexity: float
    bits_per_token: float
    bits_per_byte: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model, batches, token_bytes: np.ndarray, device: torch.device) -> Evaluation:
    """`batches`: [B, seq_len + 1] token tensors; every position but the first is a target."""
    nats, tokens, text_bytes = 0.0, 0, 0
    lengths = torch.from_numpy(token_bytes)
    for batch in batches:
        targets = batch[:, 1:]
        logits = model(batch[:, :-1].to(device))
        nats += F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum").item()
        tokens += targets.numel()
        text_bytes += int(lengths[targets].sum())
    if tokens == 0:
        raise MegamemError("no batches to evaluate. Fix: pass --max-batches of at least 1, or a dataset with samples")
    loss = nats / tokens
    return Evaluation(loss, math.exp(min(loss, 700.0)), loss / math.log(2),
                      nats / math.log(2) / text_bytes if text_bytes else math.nan, tokens)
