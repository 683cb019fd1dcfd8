"""Multiply-accumulates of a model, counted from its layers and by the paper's formula.

Counted: walks the built model. A Linear d_in x d_out costs d_in * d_out MACs per
token; a Memory Layer costs K * d_out (one multiply-add per retrieved element);
attention costs 2 s^2 d per sequence over the full square, as the paper counts.
Paper formula: 2 s^2 d + 12 s d^2 for a dense block and 2 s^2 d + 6 K s d for a
MemoryFormer block, the approximation behind Table 1 of the paper (docs/model.md,
"Multiply-adds megamem counts").
The two columns differ for MemoryFormer: counted, its Memory Block costs
K (tau+2) K + K d = 2.25 K d per token at tau = 8, where the formula assumes 3 K d.
Hashing and p (O(d) per layer) are not counted in either column.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from megamem.config.schema import Config
from megamem.model.attention import CausalAttention
from megamem.model.build import build_model
from megamem.model.embedding import LMHead
from megamem.model.memory_layer import MemoryLayer


@dataclass
class Macs:
    attention_macs: int
    non_attention_macs: int

    @property
    def total_macs(self) -> int:
        return self.attention_macs + self.non_attention_macs

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_macs": self.total_macs}


def layer_macs_per_token(module: nn.Module) -> int:
    """Per-token MACs of the Linear and Memory Layers inside `module`."""
    total = 0
    for layer in module.modules():
        if isinstance(layer, (MemoryLayer, LMHead)):
            total += layer.macs_per_token()
        elif isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features
    return total


def counted_block_macs(block: nn.Module, seq_len: int) -> Macs:
    attention = sum(m.macs_per_sequence(seq_len) for m in block.modules() if isinstance(m, CausalAttention))
    return Macs(attention, seq_len * layer_macs_per_token(block))


def paper_formula_block_macs(config: Config, seq_len: int) -> Macs:
    m = config.model
    s, d = seq_len, m.hidden_size
    if m.arch == "memoryformer":
        return Macs(2 * s * s * d, 6 * (d // m.tau) * s * d)
    return Macs(2 * s * s * d, 12 * s * d * d)


def flops_report(config: Config, seq_len: int) -> dict:
    """MACs of one block and of the whole model (blocks + head) for one sequence of seq_len tokens."""
    model = build_model(config, device="meta")
    layers = len(model.blocks)
    block = counted_block_macs(model.blocks[0], seq_len)
    formula = paper_formula_block_macs(config, seq_len)
    head = seq_len * layer_macs_per_token(model.head)

    def whole(per_block: Macs) -> dict[str, int]:
        return {"attention_macs": layers * per_block.attention_macs,
                "non_attention_macs": layers * per_block.non_attention_macs + head,
                "head_macs": head,
                "total_macs": layers * per_block.total_macs + head}

    counted_model = whole(block)
    return {
        "arch": config.model.arch,
        "seq_len": seq_len,
        "num_layers": layers,
        "block": block.as_dict(),
        "paper_formula": formula.as_dict(),
        "model": {**counted_model,
                  "paper_formula": whole(formula),
                  "macs_per_token": counted_model["total_macs"] // seq_len,
                  "training_flops_per_token": training_flops_per_token(counted_model["total_macs"] // seq_len)},
    }


def training_flops_per_token(macs_per_token: int) -> int:
    """Forward + backward FLOPs: 2 FLOPs per MAC, backward twice the forward."""
    return 3 * 2 * macs_per_token
