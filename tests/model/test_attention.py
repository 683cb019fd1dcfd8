"""Rotary embeddings and the KV cache: what decoding keeps between calls gives what recomputing would."""
from __future__ import annotations

import torch

from megamem.model.attention import Rotary
from megamem.model.kv_cache import LayerCache


def test_rotary_at_an_offset_is_the_slice_of_the_whole_sequence_and_matches_its_definition():
    """Kept cos/sin tables, grown as positions come, give the bits of the whole sequence; the roll with the sign
    folded into sin is GPT-NeoX's rotate-half."""
    rotary = Rotary(16, 0.5, 10000.0)
    x = torch.randn(2, 3, 300, 16)
    whole = rotary(x)
    parts = [rotary(x[..., :5, :]), rotary(x[..., 5:6, :], offset=5), rotary(x[..., 6:, :], offset=6)]
    assert torch.equal(torch.cat(parts, dim=-2), whole)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    angles = torch.outer(torch.arange(300, dtype=torch.float32), inv_freq).repeat(1, 2)
    rot = x[..., :8]
    expected = rot * angles.cos() + torch.cat((-rot[..., 4:], rot[..., :4]), dim=-1) * angles.sin()
    torch.testing.assert_close(whole, torch.cat((expected, x[..., 8:]), dim=-1), rtol=0, atol=0)


def test_rotary_tables_made_under_inference_mode_are_made_again_for_training():
    rotary = Rotary(16, 1.0, 10000.0)
    with torch.inference_mode():
        rotary(torch.randn(1, 1, 4, 16))
    x = torch.randn(1, 1, 4, 16, requires_grad=True)
    rotary(x).square().sum().backward()
    assert x.grad is not None


def test_the_layer_cache_grows_past_its_room_and_returns_everything_so_far():
    cache, keys, values = LayerCache(), [], []
    for step, size in enumerate([50, 1, 30, 1, 100]):
        k, v = torch.randn(2, 4, size, 8), torch.randn(2, 4, size, 8)
        keys.append(k)
        values.append(v)
        all_k, all_v = cache.extend(k, v)
        assert torch.equal(all_k, torch.cat(keys, dim=-2)) and torch.equal(all_v, torch.cat(values, dim=-2)), step
    assert cache.length == 182 and cache.keys_BHCE.shape[-2] >= 182
