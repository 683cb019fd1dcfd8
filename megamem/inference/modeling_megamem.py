"""A megamem-trained MemoryFormer, or its dense baseline, as a Hugging Face transformers model.

`megamem export --format hf` copies this file beside config.json and
model.safetensors, so that AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True) loads the model where megamem is not installed. That is
why it needs only torch and transformers and restates megamem's model (the
equations of megamem/model) in one file, with the same parameter names and the
same arithmetic: megamem's tests check that its logits equal megamem's.
Shapes: B batch, S sequence, H heads, E head dim, d hidden, K chunks, R = 2^tau.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# the output's cache field: `cache` from transformers 5.24, `past_key_values` before
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class MegamemConfig(PretrainedConfig):
    model_type = "megamem"

    def __init__(self, arch: str = "memoryformer", vocab_size: int = 257, hidden_size: int = 512,
                 num_hidden_layers: int = 6, num_attention_heads: int = 8, max_position_embeddings: int = 2048,
                 tau: int = 8, expanding_bits: int = 2, hash_temperature: float = 1.0, weighting: str = "paper",
                 memory_bias: bool = False, memory_block_gelu: bool = False, norm1: str = "rmsnorm",
                 norm2: str = "rmsnorm", norm3: str = "layernorm", final_norm: str = "rmsnorm",
                 norm_eps: float = 1e-5, rotary_fraction: float = 0.25, rotary_base: float = 10000.0,
                 ffn_multiplier: int = 4, use_cache: bool = True, **kwargs):
        self.arch, self.vocab_size, self.hidden_size = arch, vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.tau, self.expanding_bits, self.weighting = tau, expanding_bits, weighting
        self.hash_temperature = hash_temperature       # the t of p; `temperature` is generation's
        self.memory_bias, self.memory_block_gelu = memory_bias, memory_block_gelu
        self.norm1, self.norm2, self.norm3, self.final_norm, self.norm_eps = norm1, norm2, norm3, final_norm, norm_eps
        self.rotary_fraction, self.rotary_base, self.ffn_multiplier = rotary_fraction, rotary_base, ffn_multiplier
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)         # the export holds the head's table of its own
        super().__init__(**kwargs)


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


class MemoryLayer(nn.Module):
    """y = sum_k p(z_k) T_k[h(z_k)] (+ bias): the sign bits of each tau-wide chunk z_k of x pick a row of its
    table, p = prod_i sigmoid(2|z_i| / t) weights it (times sum_i |z_i| with the l1 weighting)."""

    def __init__(self, in_features: int, out_features: int, tau: int, config: MegamemConfig):
        super().__init__()
        self.tau, self.temperature, self.weighting = tau, config.hash_temperature, config.weighting
        self.tables = nn.Parameter(torch.empty(in_features // tau, 2**tau, out_features))     # [K, R, D]
        self.bias = nn.Parameter(torch.empty(out_features)) if config.memory_bias else None

    def hash(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = x.unflatten(-1, (x.shape[-1] // self.tau, self.tau))                      # [..., K, tau]
        powers = 1 << torch.arange(self.tau, device=x.device, dtype=torch.int64)
        codes = ((z >= 0).to(torch.int64) * powers).sum(-1)
        magnitude = z.abs().to(torch.promote_types(z.dtype, torch.float32))
        p = F.logsigmoid(2.0 * magnitude / self.temperature).sum(-1).exp()
        if self.weighting == "l1":
            p = p * magnitude.sum(-1)
        return codes, p

    def forward(self, x: torch.Tensor, hashed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        codes, p = hashed if hashed is not None else self.hash(x)
        num_tables, rows, d_out = self.tables.shape
        offsets = torch.arange(num_tables, device=codes.device, dtype=torch.int64) * rows
        y = F.embedding_bag(codes.reshape(-1, num_tables) + offsets, self.tables.reshape(num_tables * rows, d_out),
                            per_sample_weights=p.reshape(-1, num_tables).to(self.tables.dtype), mode="sum")
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*codes.shape[:-1], d_out)


class Attention(nn.Module):
    """Causal multi-head attention, GPT-NeoX rotary embedding on the first rotary_fraction of each head."""

    def __init__(self, config: MegamemConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_dims, self.rotary_base = int(self.head_dim * config.rotary_fraction), config.rotary_base

    def rotate(self, x_BHSE: torch.Tensor, positions_BS: torch.Tensor) -> torch.Tensor:
        if self.rotary_dims == 0:
            return x_BHSE
        exponents = torch.arange(0, self.rotary_dims, 2, device=x_BHSE.device, dtype=torch.float32) / self.rotary_dims
        angles = positions_BS.float()[..., None] * (1.0 / self.rotary_base ** exponents)
        angles = torch.cat((angles, angles), dim=-1)[:, None]                          # [B, 1, S, rotary dims]
        cos, sin = angles.cos().to(x_BHSE.dtype), angles.sin().to(x_BHSE.dtype)
        rot, rest = x_BHSE[..., : self.rotary_dims], x_BHSE[..., self.rotary_dims:]
        half = self.rotary_dims // 2
        return torch.cat((rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin, rest), dim=-1)

    def forward(self, q_BSd, k_BSd, v_BSd, positions_BS, mask, cache) -> torch.Tensor:
        """`mask`: None for plain causal attention over the positions so far, else which keys each query sees."""
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for t in (q_BSd, k_BSd, v_BSd))
        q, k = self.rotate(q, positions_BS), self.rotate(k, positions_BS)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_index)
        if mask is None and k.shape[-2] == q.shape[-2]:
            o_BHSE = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o_BHSE = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask is not None else
                                                    _causal(q.shape[-2], k.shape[-2], q.device))
        return o_BHSE.transpose(1, 2).flatten(-2)


def _causal(queries: int, keys: int, device) -> torch.Tensor:
    """Query i sits at position keys - queries + i and sees keys 0 .. that position."""
    past = keys - queries
    return torch.arange(keys, device=device)[None, :] <= torch.arange(past, keys, device=device)[:, None]


class MemoryFormerBlock(nn.Module):
    """a = Norm1(X); Z = X + MHA(ML_Q(a), ML_K(a), ML_V(a)); Y = Z + ML2(Norm3(ML1(Norm2(Z))))."""

    def __init__(self, config: MegamemConfig, layer_index: int):
        super().__init__()
        d, tau = config.hidden_size, config.tau
        wide = (tau + config.expanding_bits) * (d // tau)
        self.norm1 = _norm(config.norm1, d, config.norm_eps)
        self.q, self.k, self.v = (MemoryLayer(d, d, tau, config) for _ in range(3))
        self.attention = Attention(config, layer_index)
        self.norm2 = _norm(config.norm2, d, config.norm_eps)
        self.ml1 = MemoryLayer(d, wide, tau, config)
        self.norm3 = _norm(config.norm3, wide, config.norm_eps)
        self.gelu = config.memory_block_gelu
        self.ml2 = MemoryLayer(wide, d, tau + config.expanding_bits, config)

    def forward(self, x_BSd, positions_BS, mask, cache) -> torch.Tensor:
        a_BSd = self.norm1(x_BSd)
        hashed = self.q.hash(a_BSd)                    # Q, K and V share one input, hence one hashing
        z_BSd = x_BSd + self.attention(self.q(a_BSd, hashed), self.k(a_BSd, hashed), self.v(a_BSd, hashed),
                                       positions_BS, mask, cache)
        wide = self.norm3(self.ml1(self.norm2(z_BSd)))
        return z_BSd + self.ml2(F.gelu(wide) if self.gelu else wide)


class DenseBlock(nn.Module):
    """The Pythia baseline: Y = X + Out(MHA(QKV(Norm1(X)))) + FC2(GeLU(FC1(Norm2(X))))."""

    def __init__(self, config: MegamemConfig, layer_index: int):
        super().__init__()
        d, ffn = config.hidden_size, config.ffn_multiplier * config.hidden_size
        self.norm1 = _norm(config.norm1, d, config.norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.attention = Attention(config, layer_index)
        self.out = nn.Linear(d, d)
        self.norm2 = _norm(config.norm2, d, config.norm_eps)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x_BSd, positions_BS, mask, cache) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x_BSd)).chunk(3, dim=-1)
        attention = self.out(self.attention(q, k, v, positions_BS, mask, cache))
        return x_BSd + attention + self.fc2(F.gelu(self.fc1(self.norm2(x_BSd))))


class MegamemForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegamemConfig
    base_model_prefix = "megamem"
    _no_split_modules = ["MemoryFormerBlock", "DenseBlock"]
    _supports_sdpa = True

    def __init__(self, config: MegamemConfig):
        super().__init__(config)
        block = MemoryFormerBlock if config.arch == "memoryformer" else DenseBlock
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(block(config, index) for index in range(config.num_hidden_layers))
        self.final_norm = _norm(config.final_norm, config.hidden_size, config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """A model built from its config alone (weights are then loaded over this): megamem's initialisation."""
        if isinstance(module, MemoryLayer):
            nn.init.normal_(module.tables, std=0.02)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.001)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, past_key_values=None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None, **kwargs):
        """`cache` (`past_key_values` before transformers 5.24): the keys and values of the positions so far.
        `attention_mask` [B, positions so far + S]: 0 marks padding, which no query attends to."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        batch, seq = input_ids.shape
        if past + seq > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + seq} tokens exceeds the model's "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            valid_BK = attention_mask[:, -(past + seq):].bool()
            mask = _causal(seq, past + seq, input_ids.device)[None, None] & valid_BK[:, None, None, :]
            mask = mask | ~mask.any(-1, keepdim=True)   # a query on padding sees no key: let it see all, unused
            if position_ids is None:
                position_ids = (valid_BK.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
        x_BSd = self.embed(input_ids)
        for block in self.blocks:
            x_BSd = block(x_BSd, position_ids, mask, cache)
        logits = self.head(self.final_norm(x_BSd))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
