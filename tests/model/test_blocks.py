"""Both blocks: shapes, parameter counts against the MF-tiny/small/base sizes and Pythia, shared hashing."""
from __future__ import annotations

import pytest
import torch

from megamem.config import load_config
from megamem.kernels.reference import ReferenceKernel
from megamem.model import DenseBlock, MemoryFormerBlock, build_model
from megamem.model.memory_layer import MemoryLayer
from tests.paths import CONFIGS


def table_params(model) -> int:
    return sum(m.tables.numel() for m in model.modules() if isinstance(m, MemoryLayer))


@pytest.mark.parametrize("name, billions", [("memoryformer-tiny", 0.42), ("memoryformer-small", 1.87),
                                            ("memoryformer-base", 6.64)])
def test_table_parameters_match_the_spec(name, billions):
    config = load_config([CONFIGS / f"{name}.yaml"])
    m = config.model
    d, k = m.hidden_size, m.hidden_size // m.tau
    per_layer = 3 * k * 2**m.tau * d + k * (2**m.tau * (m.tau + 2) * k + 2 ** (m.tau + 2) * d)   # Q, K, V; ML1 + ML2
    model = build_model(config, device="meta")
    assert table_params(model) == m.num_layers * per_layer
    assert round(table_params(model) / 1e9, 2) == billions


@pytest.mark.parametrize("name, total", [("pythia-70m", 70_426_624), ("pythia-160m", 162_322_944),
                                         ("pythia-410m", 405_334_016)])
def test_dense_baselines_have_pythias_parameter_counts(name, total):
    model = build_model(load_config([CONFIGS / f"{name}.yaml"]), device="meta")
    assert sum(p.numel() for p in model.parameters()) == total
    assert table_params(model) == 0


def test_memoryformer_block_layout(tiny_config):
    block = MemoryFormerBlock(tiny_config.model, ReferenceKernel)
    d, k = 64, 8
    assert [(m.in_features, m.out_features, m.tau) for m in (block.q, block.k, block.v, block.ml1, block.ml2)] == \
        [(d, d, 8)] * 3 + [(d, 10 * k, 8), (10 * k, d, 10)]
    assert not any(isinstance(m, torch.nn.Linear) for m in block.modules())          # no output projection, no FFN
    x = torch.randn(2, 16, d)
    assert block(x).shape == x.shape


def test_dense_block_shapes(tiny_config):
    tiny_config.model.arch = "dense"
    block = DenseBlock(tiny_config.model)
    assert block.fc1.out_features == 4 * 64 and block.out.in_features == 64
    x = torch.randn(2, 16, 64)
    assert block(x).shape == x.shape


class CountingKernel(ReferenceKernel):
    calls: list[str] = []

    @staticmethod
    def hash(*args):
        CountingKernel.calls.append("hash")
        return ReferenceKernel.hash(*args)

    @staticmethod
    def gather_sum(*args):
        CountingKernel.calls.append("gather_sum")
        return ReferenceKernel.gather_sum(*args)

    @staticmethod
    def hash_gather_sum(*args):
        CountingKernel.calls.append("hash_gather_sum")
        return ReferenceKernel.hash_gather_sum(*args)


def test_q_k_v_share_one_hashing(tiny_config):
    CountingKernel.calls = []
    block = MemoryFormerBlock(tiny_config.model, CountingKernel)
    block(torch.randn(1, 8, 64))
    assert CountingKernel.calls == ["hash"] + ["gather_sum"] * 3 + ["hash_gather_sum"] * 2   # QKV hashed once; ML1, ML2


def test_gelu_option_changes_the_memory_block(tiny_config):
    torch.manual_seed(0)
    plain = MemoryFormerBlock(tiny_config.model, ReferenceKernel)
    tiny_config.model.memory_block_gelu = True
    with_gelu = MemoryFormerBlock(tiny_config.model, ReferenceKernel)
    with_gelu.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 64)
    assert not torch.allclose(plain(x), with_gelu(x))


def test_causality(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    tokens = torch.randint(0, 97, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 97
    torch.testing.assert_close(model(tokens)[0, :10], model(changed)[0, :10])
    assert not torch.allclose(model(tokens)[0, 10:], model(changed)[0, 10:])
