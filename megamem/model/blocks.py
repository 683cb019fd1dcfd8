"""The two transformer blocks megamem trains, built from the same parts.

MemoryFormerBlock (docs/model.md, "The MemoryFormer block"), pre-norm with a sequential residual:
    a = Norm1(X);  Q, K, V = ML_Q(a), ML_K(a), ML_V(a)   (one shared hashing of a)
    Z = X + MHA(Q, K, V)                                  (no output projection)
    Y = Z + ML2(Norm3(ML1(Norm2(Z))))                     (the Memory Block)
DenseBlock: the Pythia / GPT-NeoX baseline, parallel residual
    Y = X + Out(MHA(QKV(Norm1(X)))) + FC2(GeLU(FC1(Norm2(X))))
Shapes: B batch, S sequence, d hidden.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamem.config.schema import ModelConfig
from megamem.model.attention import CausalAttention
from megamem.model.init import TorchInit, init_norm
from megamem.model.kv_cache import LayerCache
from megamem.model.memory_layer import MemoryLayer, released_qkv_std
from megamem.model.norms import make_norm


def _attention(cfg: ModelConfig) -> CausalAttention:
    return CausalAttention(cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.rotary_fraction, cfg.rotary_base)


class MemoryFormerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel):
        super().__init__()
        d, tau = cfg.hidden_size, cfg.tau
        wide = (tau + cfg.expanding_bits) * (d // tau)      # ML1 output: K chunks of tau + expanding bits

        def memory(d_in: int, d_out: int, chunk_bits: int, std: float) -> MemoryLayer:
            return MemoryLayer(d_in, d_out, chunk_bits, kernel, cfg.temperature, cfg.weighting, cfg.memory_bias, std)

        qkv_std = released_qkv_std(d) if cfg.qkv_table_init == "released" else cfg.table_init_std
        self.norm1 = make_norm(cfg.norm1, d, cfg.norm_eps)
        self.q, self.k, self.v = (memory(d, d, tau, qkv_std) for _ in range(3))
        self.attention = _attention(cfg)
        self.norm2 = make_norm(cfg.norm2, d, cfg.norm_eps)
        self.ml1 = memory(d, wide, tau, cfg.table_init_std)
        self.norm3 = make_norm(cfg.norm3, wide, cfg.norm_eps)
        self.gelu = cfg.memory_block_gelu
        self.ml2 = memory(wide, d, tau + cfg.expanding_bits, cfg.table_init_std)

    def init_weights(self, init) -> None:
        for norm in (self.norm1, self.norm2, self.norm3):
            init_norm(norm, init)
        for layer in (self.q, self.k, self.v, self.ml1, self.ml2):
            layer.init_weights(init)

    def forward(self, x_BSd: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        a_BSd = self.norm1(x_BSd)
        hashed = self.q.hash(a_BSd)
        z_BSd = x_BSd + self.attention(self.q(a_BSd, hashed), self.k(a_BSd, hashed), self.v(a_BSd, hashed), cache)
        return z_BSd + self.ml2(self.memory_block_middle(self.ml1(self.norm2(z_BSd))))

    def memory_block_middle(self, wide: torch.Tensor) -> torch.Tensor:
        """Between ML1 and ML2: Norm3, and the optional GeLU."""
        wide = self.norm3(wide)
        return F.gelu(wide) if self.gelu else wide


class DenseBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, ffn = cfg.hidden_size, cfg.ffn_multiplier * cfg.hidden_size
        self.norm1 = make_norm(cfg.norm1, d, cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.attention = _attention(cfg)
        self.out = nn.Linear(d, d)
        self.norm2 = make_norm(cfg.norm2, d, cfg.norm_eps)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.init_std = cfg.init_std
        self.init_weights(TorchInit)

    def init_weights(self, init) -> None:
        for norm in (self.norm1, self.norm2):
            init_norm(norm, init)
        for linear in (self.qkv, self.out, self.fc1, self.fc2):
            init.normal(linear.weight, self.init_std)
            init.zeros(linear.bias)

    def forward(self, x_BSd: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x_BSd)).chunk(3, dim=-1)
        attention = self.out(self.attention(q, k, v, cache))
        mlp = self.fc2(F.gelu(self.fc1(self.norm2(x_BSd))))
        return x_BSd + attention + mlp
