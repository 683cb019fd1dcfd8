"""Bucket usage of every Memory Layer: the health signal only a MemoryFormer has.

A table whose rows are rarely hit wastes memory and learns slowly; the paper
reports near-uniform bucket use (its Figure 4) and calls the norm before ML2
vital for it. Per layer and log interval this reports the normalized entropy of
bucket use (1 = uniform), the fraction of buckets never hit, and the mean p.
Counting is an observer attached to each Memory Layer that hashes; Q, K and V
share one hashing, reported as `qkv`. The observer is handed the codes and p the
kernel computed anyway (fused kernels return them), so watching costs a bincount,
not the fused path. Each rank counts the (token, chunk) pairs it hashed itself:
under tensor parallelism a token's chunks are hashed once in the whole group,
so the sums over the tensor- and data-parallel ranks are the model's counts.
Activation checkpointing replays the forward and counts twice, which leaves
every reported ratio unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megamem.model.memory_layer import MemoryLayer
from megamem.training.engine import whole_shape

KIND_OF = {"q": "qkv", "ml1": "ml1", "ml2": "ml2"}


def whole_chunks(layer: MemoryLayer) -> int:
    """The chunk count of the whole layer, whether tensor parallelism or ZeRO 3 cut its tables."""
    return whole_shape(layer.tables)[0]


class BucketStats:
    """`rename` gives a module's plain name where the model renames them (a pipeline numbers its layers)."""

    def __init__(self, model: nn.Module, rename=None):
        self.layers: dict[str, MemoryLayer] = {}
        for name, module in model.named_modules():
            name = rename(name) if rename and name else name
            short = name.rsplit(".", 1)[-1]
            if isinstance(module, MemoryLayer) and short in KIND_OF:
                label = f"{name.rsplit('.', 1)[0]}.{KIND_OF[short]}"
                self.layers[label] = module
                module.observer = self._observe
        self.labels = {id(m): label for label, m in self.layers.items()}
        self.counts = {label: torch.zeros(whole_chunks(m) * 2**m.tau, dtype=torch.int64, device=m.tables.device)
                       for label, m in self.layers.items()}
        # p's sum and count, in float64 so that both survive an all-reduce exactly enough
        self.p_moments = {label: torch.zeros(2, dtype=torch.float64, device=m.tables.device)
                          for label, m in self.layers.items()}

    def _observe(self, layer: MemoryLayer, codes: torch.Tensor, p: torch.Tensor, first_chunk: int) -> None:
        if not layer.training:
            return
        label = self.labels[id(layer)]
        chunks = codes.shape[-1]
        rows = 2**layer.tau
        offsets = torch.arange(first_chunk, first_chunk + chunks, device=codes.device, dtype=torch.int64) * rows
        with torch.no_grad():
            flat = (codes.reshape(-1, chunks).long() + offsets).reshape(-1)     # kernels' codes may be int16
            self.counts[label] += torch.bincount(flat, minlength=self.counts[label].numel())
            self.p_moments[label] += torch.stack([p.detach().double().sum(),
                                                  p.new_tensor(p.numel(), dtype=torch.float64)])

    def reduce(self, groups=()) -> None:
        """Sum counts and p over the given groups, e.g. tensor- then data-parallel (collective on each group)."""
        if not dist.is_initialized():
            return
        for group in groups:
            if dist.get_world_size(group) == 1:
                continue
            for label in self.layers:
                dist.all_reduce(self.counts[label], group=group)
                dist.all_reduce(self.p_moments[label], group=group)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer: normalized entropy, never-hit fraction, mean p, over the interval since the last reset."""
        out = {}
        for label, layer in self.layers.items():
            counts = self.counts[label].view(whole_chunks(layer), -1).double()
            totals = counts.sum(1, keepdim=True).clamp_min(1)
            probs = counts / totals
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(1) / math.log(counts.shape[1])
            out[label] = {"entropy": entropy.mean().item(), "unused_fraction": (counts == 0).double().mean().item(),
                          "mean_p": (self.p_moments[label][0] / self.p_moments[label][1].clamp_min(1)).item()}
        return out

    def histograms(self) -> dict[str, torch.Tensor]:
        """Bucket counts of the first table of the first block and the last table of the last block, per kind."""
        out = {}
        for kind in sorted(set(KIND_OF.values())):
            labels = [label for label in self.layers if label.endswith(f".{kind}")]
            if not labels:
                continue
            first, last = self.layers[labels[0]], self.layers[labels[-1]]
            out[f"{kind}/first_table"] = self.counts[labels[0]].view(whole_chunks(first), -1)[0].cpu()
            out[f"{kind}/last_table"] = self.counts[labels[-1]].view(whole_chunks(last), -1)[-1].cpu()
        return out

    @staticmethod
    def across_stages(local: dict, group) -> dict:
        """Every pipeline stage's summary() or histograms(), merged (collective over the pipeline group): stages
        hold different blocks, and a histogram of the first table comes from the first stage that has one."""
        if dist.get_world_size(group) == 1:
            return local
        stages = [None] * dist.get_world_size(group)
        dist.all_gather_object(stages, local, group=group)
        merged: dict = {}
        for stage in stages:
            for key, value in stage.items():
                if key.endswith("/first_table"):
                    merged.setdefault(key, value)
                else:
                    merged[key] = value
        return merged

    def reset(self) -> None:
        for label in self.layers:
            self.counts[label].zero_()
            self.p_moments[label].zero_()
