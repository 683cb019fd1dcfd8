"""Bytes one rank receives for one block under tensor parallelism, by formula.

The arithmetic of docs/parallel.md ("What each collective moves"), written out collective by collective
for what megamem's blocks do (megamem.parallel.memoryformer_tp and dense_tp), so
that the byte counters of megamem.parallel.mappings can be checked against it
(tests/parallel) and benchmarks/comm_volume.py can extend it to sizes no CPU
runs (tp = 8, MF-base). Counted per micro-batch of `tokens` = batch x seq
positions in one tensor-parallel group, as the counters see them, and therefore
including the small per-micro-batch term of replicated weights' gradients.

Ring conventions (received by one rank): all-gather (tp-1)/tp of its output,
reduce-scatter and all-to-all (tp-1)/tp of their input, all-reduce twice that.
"""
from __future__ import annotations

from dataclasses import dataclass

from megamem.config.schema import ModelConfig
from megamem.parallel.hashed_exchange import P_DTYPES, code_dtype


@dataclass(frozen=True)
class Traffic:
    forward: int
    backward: int


class _Ring:
    def __init__(self, tp: int):
        self.tp = tp

    def gather(self, out_bytes: int) -> int:
        return out_bytes - out_bytes // self.tp

    def scatter(self, in_bytes: int) -> int:        # reduce-scatter and all-to-all
        return in_bytes - in_bytes // self.tp

    def all_reduce(self, nbytes: int) -> int:
        return 2 * (nbytes - nbytes // self.tp)


def _norm_params(kind: str, width: int) -> int:
    return 2 * width if kind == "layernorm" else width


def memoryformer_block(m: ModelConfig, tp: int, layout: str, p_dtype: str, act_bytes: int, tokens: int) -> Traffic:
    """One MemoryFormer block, `column` or `table` layout (see memoryformer_tp's docstring for the steps)."""
    ring, S, d = _Ring(tp), tokens, m.hidden_size
    k = d // m.tau
    wide = (m.tau + m.expanding_bits) * k
    pb = P_DTYPES[p_dtype].itemsize
    cb, cb2 = code_dtype(m.tau).itemsize, code_dtype(m.tau + m.expanding_bits).itemsize
    heads_out = ring.scatter(S * d // tp * act_bytes)           # attention output: all-to-all to the residual
    replicated = _norm_params(m.norm1, d) + _norm_params(m.norm2, d)
    if layout == "column":
        stats = (2 if m.norm3 == "layernorm" else 1) * ring.all_reduce(S * 4)
        forward = (ring.gather(S * k * cb) + ring.gather(S * k * pb)) * 2 + ring.gather(S * k * cb2) \
            + ring.gather(S * k * pb) + stats + 2 * heads_out
        backward = 3 * ring.scatter(S * k * pb) + stats + 2 * heads_out
    else:
        local = S // tp
        route = ring.scatter(local * k * cb) + ring.scatter(local * k * pb)
        route2 = ring.scatter(local * k * cb2) + ring.scatter(local * k * pb)
        sums = sum(ring.scatter(S * width * act_bytes) for width in (3 * d, wide, d))    # Q K V, ML1, ML2
        forward = 2 * route + route2 + sums + heads_out
        backward = 3 * ring.scatter(S * (k // tp) * pb) + sums + heads_out
        replicated += _norm_params(m.norm3, wide) + ((wide + d) if m.memory_bias else 0)
    return Traffic(forward, backward + ring.all_reduce(replicated * act_bytes))


def pythia_block(m: ModelConfig, tp: int, act_bytes: int, tokens: int) -> Traffic:
    """megamem's dense block: parallel residual, one all-gather and one reduce-scatter each way."""
    ring, S, d = _Ring(tp), tokens, m.hidden_size
    one_way = ring.gather(S * d * act_bytes) + ring.scatter(S * d * act_bytes)
    replicated = _norm_params(m.norm1, d) + _norm_params(m.norm2, d) + 2 * d       # + the two output biases
    return Traffic(one_way, one_way + ring.all_reduce(replicated * act_bytes))


def megatron_sequential_block(m: ModelConfig, tp: int, act_bytes: int, tokens: int) -> Traffic:
    """Megatron's sequential block with sequence parallelism (the comparison in docs/parallel.md): an all-gather and a
    reduce-scatter around attention and around the MLP; backward their duals plus the re-gather of both
    inputs (Megatron keeps the local input and gathers it again for the weight gradient). Its replicated
    weights (norms, the two output biases) are counted like megamem's, per micro-batch; Megatron reduces
    them once per step, the same with one micro-batch a step."""
    ring, S, d = _Ring(tp), tokens, m.hidden_size
    gather, scatter = ring.gather(S * d * act_bytes), ring.scatter(S * d * act_bytes)
    replicated = _norm_params(m.norm1, d) + _norm_params(m.norm2, d) + 2 * d
    backward = 2 * (gather + scatter) + 2 * gather + ring.all_reduce(replicated * act_bytes)
    return Traffic(2 * (gather + scatter), backward)
