"""The language model end to end on CPU."""
from __future__ import annotations

import math

import pytest
import torch

from megamem.model import build_model, lm_loss


def test_tables_hold_the_padded_vocabulary_and_logits_the_real_one(tiny_config):
    model = build_model(tiny_config)
    assert model.embed.weight.shape[0] == model.head.weight.shape[0] == 128   # 97 padded to the multiple of 64 x tp 1
    logits = model(torch.randint(0, 97, (2, 32)))
    assert logits.shape == (2, 32, 97)             # padded ids are never predicted


def test_the_seed_decides_the_initial_model(tiny_config):
    first, again = build_model(tiny_config), build_model(tiny_config)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    tiny_config.run.seed += 1
    assert not torch.equal(build_model(tiny_config).embed.weight, first.embed.weight)


def test_untied_by_default_and_tie_option(tiny_config):
    assert build_model(tiny_config).head.weight is not build_model(tiny_config).embed.weight
    tiny_config.model.tie_embeddings = True
    model = build_model(tiny_config)
    assert model.head.weight is model.embed.weight


def test_refuses_sequences_longer_than_seq_len(tiny_config):
    with pytest.raises(ValueError, match="exceeds model.seq_len=32"):
        build_model(tiny_config)(torch.zeros(1, 33, dtype=torch.long))


def test_memoryformer_overfits_one_batch(tiny_config):
    """Random tokens have a unigram entropy of about ln(97) = 4.57 nats, so a loss
    under 1.0 is only reachable by memorising which token follows which context:
    the Memory Layers, attention and their gradients all have to work."""
    torch.manual_seed(0)
    model = build_model(tiny_config)
    tokens = torch.randint(0, 97, (4, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = lm_loss(model(inputs), targets)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(first - math.log(97)) < 0.5
    assert loss.item() < 1.0
