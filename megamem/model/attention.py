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

    def forward(self, x_BHSE: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Positions offset .. offset + S - 1 (offset: the positions a KV cache already holds). Frequencies are
        recomputed per call (dims / 2 numbers), so a model built on the meta device needs no buffers."""
        if self.dims == 0:
            return x_BHSE
        seq, device = x_BHSE.shape[-2], x_BHSE.device
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dims, 2, device=device, dtype=torch.float32) / self.dims))
        positions = torch.arange(offset, offset + seq, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)                               # [S, dims]
        cos, sin = angles.cos().to(x_BHSE.dtype), angles.sin().to(x_BHSE.dtype)
        rot, rest = x_BHSE[..., : self.dims], x_BHSE[..., self.dims:]
        half = self.dims // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated_half * sin, rest), dim=-1)


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
        else:                       # query i sits at position past + i and sees keys 0 .. past + i
            seen = torch.arange(k.shape[-2], device=q.device)[None, :] <= \
                torch.arange(past, past + q.shape[-2], device=q.device)[:, None]
            o_BHSE = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return o_BHSE.transpose(1, 2).flatten(-2)

    def macs_per_sequence(self, seq_len: int) -> int:
        """Q K^T and A V over the full square, as the paper counts: 2 s^2 d."""
        return 2 * seq_len * seq_len * self.num_heads * self.head_dim
