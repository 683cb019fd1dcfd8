"""Activation checkpointing changes memory, not results or parameter names: blocks keep their inputs only and run
again in backward."""
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


def _forward_and_backward(model, tokens) -> tuple[int, int, int]:
    """(runs of the blocks' first norm in forward, runs in forward and backward, bytes saved for backward)."""
    runs, saved = [], []
    for block in model.blocks:
        block.norm1.register_forward_hook(lambda *_: runs.append(1))

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    in_forward = len(runs)
    loss.backward()
    return in_forward, len(runs), sum(saved)


def test_blocks_keep_only_their_inputs_and_run_again_in_backward(tiny_config):
    """What it is for: far fewer bytes saved for backward, paid for by each block's forward running again in
    backward (counted at its first norm). A no-op would save as much as the plain model and run each block once."""
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    blocks = tiny_config.model.num_layers
    plain = _forward_and_backward(build_model(tiny_config), tokens)
    checkpointed_model = build_model(tiny_config)
    apply_activation_checkpointing(checkpointed_model)
    checkpointed = _forward_and_backward(checkpointed_model, tokens)
    assert plain[:2] == (blocks, blocks) and checkpointed[:2] == (blocks, 2 * blocks)
    assert checkpointed[2] < plain[2] / 2, (plain, checkpointed)
