"""Activation checkpointing changes memory, not results or parameter names."""
from __future__ import annotations

import torch

from megamem.model import build_model, lm_loss
from megamem.parallel.activation_checkpointing import apply_activation_checkpointing


def test_same_loss_gradients_and_names(tiny_config):
    torch.manual_seed(0)
    plain = build_model(tiny_config)
    checkpointed = build_model(tiny_config)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed)
    tokens = torch.randint(0, 97, (2, 17))
    for model in (plain, checkpointed):
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
