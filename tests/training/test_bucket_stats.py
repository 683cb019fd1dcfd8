"""Bucket statistics against hand-made code distributions."""
from __future__ import annotations

import math

import pytest
import torch

from megamem.kernels import get_kernel
from megamem.model.memory_layer import MemoryLayer
from megamem.training.bucket_stats import BucketStats


class OneBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = MemoryLayer(8, 4, tau=4, kernel=get_kernel("reference"))
        self.ml1 = MemoryLayer(8, 4, tau=4, kernel=get_kernel("reference"))


def all_codes_once(tau: int = 4, chunks: int = 2) -> torch.Tensor:
    """Inputs whose chunks take every sign pattern exactly once."""
    codes = torch.arange(2**tau)
    bits = ((codes[:, None] >> torch.arange(tau)) & 1).float() * 2 - 1       # +1 where the bit is set
    return bits.repeat(1, chunks)


def test_uniform_use_has_entropy_one_and_no_unused_buckets():
    block = OneBlock()
    stats = BucketStats(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([block])}))
    block.q.hash(all_codes_once())
    summary = stats.summary()["blocks.0.qkv"]
    assert summary["entropy"] == pytest.approx(1.0) and summary["unused_fraction"] == 0.0
    assert summary["mean_p"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item() ** 4)


def test_one_bucket_has_entropy_zero_and_the_rest_unused():
    block = OneBlock()
    stats = BucketStats(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([block])}))
    block.ml1(torch.ones(50, 8))
    summary = stats.summary()["blocks.0.ml1"]
    assert summary["entropy"] == 0.0 and summary["unused_fraction"] == pytest.approx(15 / 16)
    assert stats.histograms()["ml1/first_table"].tolist() == [0] * 15 + [50]
    stats.reset()
    assert stats.summary()["blocks.0.ml1"]["unused_fraction"] == 1.0


def test_evaluation_is_not_counted():
    block = OneBlock().eval()
    stats = BucketStats(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([block])}))
    block.q.hash(all_codes_once())
    assert stats.counts["blocks.0.qkv"].sum() == 0
    assert math.isclose(stats.summary()["blocks.0.qkv"]["unused_fraction"], 1.0)


def test_watching_keeps_the_fused_path():
    """The observer takes the codes the fused kernel returns: no separate hash, no unfused gather."""
    calls = []

    class Counting:
        name = "counting"

        @staticmethod
        def hash(*args):
            calls.append("hash")
            return get_kernel("reference").hash(*args)

        @staticmethod
        def hash_gather_sum(*args, with_codes=False):
            calls.append(("hash_gather_sum", with_codes))
            return get_kernel("reference").hash_gather_sum(*args, with_codes=with_codes)

    block = OneBlock()
    block.ml1.kernel = Counting
    stats = BucketStats(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([block])}))
    block.ml1(all_codes_once())
    assert calls == [("hash_gather_sum", True)]
    assert stats.summary()["blocks.0.ml1"]["entropy"] == pytest.approx(1.0)
