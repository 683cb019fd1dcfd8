"""Causal multi-head attention with rotary embeddings on part of each head.

Shared by both blocks; only the projections around it differ (MemoryFormer has
Memory Layers for Q, K, V and no output projection, Pythia has Linears and one).
Shapes: B batch, S sequence, H heads, E head dim, d = H * E.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamem.model.kv_cache import LayerCache


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding applied to the first `dims` of each head."""

    def __init__(self, head_dim: int, fraction: float, base: float):
        super().__init__()
        self.dims, self.base = int(head_dim * fraction), base
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None      # [P, dims] each, positions 0 .. P - 1

    def forward(self, x_BHSE: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Positions offset .. offset + S - 1 (offset: the positions a KV cache already holds)."""
        if self.dims == 0:
            return x_BHSE
        cos, sin_signed = (table[offset:offset + x_BHSE.shape[-2]]
                           for table in self.cos_sin(offset + x_BHSE.shape[-2], x_BHSE))
        rot, rest = x_BHSE[..., : self.dims], x_BHSE[..., self.dims:]
        # rotating the halves: (x1, x2) -> (-x2, x1), as a roll and the sign folded into sin
        rotated = rot * cos + rot.roll(self.dims // 2, dims=-1) * sin_signed
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated

    def cos_sin(self, positions: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, and sin negated on the first half, of the angles of positions 0 .. at least `positions` - 1, in
        like's dtype and device. Kept between calls, not as buffers, so that a model built on the meta device
        needs none: decoding asks for one position at a time, and computing them each time was a tenth of
        MF-tiny's time per token. Tables made under inference_mode are made again for autograd, which cannot
        save them."""
        kept = self._cos_sin
        if (kept is None or kept[0].shape[0] < positions or kept[0].device != like.device or kept[0].dtype != like.dtype
                or (kept[0].is_inference() and not torch.is_inference_mode_enabled())):
            count = max(positions, 2 * (kept[0].shape[0] if kept is not None else 0))
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dims, 2, device=like.device, dtype=torch.float32)
                                            / self.dims))
            angles = torch.outer(torch.arange(count, device=like.device, dtype=torch.float32), inv_freq)
            sin = angles.sin()
            self._cos_sin = kept = (torch.cat((angles, angles), dim=-1).cos().to(like.dtype),      # [P, dims]
                                    torch.cat((-sin, sin), dim=-1).to(like.dtype))
        return kept


class CausalAttention(nn.Module):
    """softmax(Q K^T / sqrt(E)) V per head, causal, through scaled_dot_product_attention.

    The head count is read off the inputs (width / head_dim): a tensor-parallel
    rank runs the same module on its own heads.
    """

    def __init__(self, num_heads: int, head_dim: int, rotary_fraction: float, rotary_base: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.rotary = Rotary(head_dim, rotary_fraction, rotary_base)

    def forward(self, q_BSd: torch.Tensor, k_BSd: torch.Tensor, v_BSd: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        """With a cache, the inputs are the positions after those it holds, which they attend to as well."""
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for t in (q_BSd, k_BSd, v_BSd))
        past = cache.length if cache is not None else 0
        q, k = self.rotary(q, past), self.rotary(k, past)
        if cache is not None:
            k, v = cache.extend(k, v)
        if past == 0:
            o_BHSE = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif q.shape[-2] == 1:      # the one new position sees every key
            o_BHSE = F.scaled_dot_product_attention(q, k, v)
        else:                       # query i sits at position past + i and sees keys 0 .. past + i
            seen = torch.arange(k.shape[-2], device=q.device)[None, :] <= \
                torch.arange(past, past + q.shape[-2], device=q.device)[:, None]
            o_BHSE = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return o_BHSE.transpose(1, 2).flatten(-2)

    def macs_per_sequence(self, seq_len: int) -> int:
        """Q K^T and A V over the full square, as the paper counts: 2 s^2 d."""
        return 2 * seq_len * seq_len * self.num_heads * self.head_dim
