"""The fused CPU Memory Layer (kernels/cpu/*.cpp) behind the kernel interface.

CPUs and RAM sit idle beside GPUs, and a lookup does tau times fewer operations
than a matmul, but it is a gather bound by memory bandwidth: written as separate
torch ops it is several times slower than nn.Linear. The C++ kernels hash with
vectorized exponentials and gather from a column-blocked copy of the tables that
keeps row reads in L2 (see the comment at the top of cpu/gather_sum.cpp). They
keep that copy and their index buffers between calls, one set per calling thread,
sized for the largest layer served: about the largest layer's tables in float32
(twice that for a backward of more than 16k tokens), plus a token tile of up to
2 MB per worker thread. The C++ sources are compiled on first use with torch's
extension builder (gcc, ninja) for this machine's instruction set and cached; the
cache name carries a hash of the sources and of the CPU's feature flags, so a
shared home directory never hands one machine another's binary.

Hash and gather-sum are separate autograd Functions, as in the reference, so
layers that share codes (Q, K, V) add their gradients of p before the input's.

Packing the tables reads every row of every table, so at a few thousand tokens it
costs a forward more than the gather does. A model used for inference marks its
tables with keep_packed (megamem.inference.load_trained does): the kernel then
keeps each marked table's packed copy, as much memory again as the tables in
float32, and packs again only when the table has changed (its storage or version).
A write through `tables.data` changes neither, so code that updates a marked table
that way unmarks it first (keep_packed(tables, False)). Training leaves tables
unmarked: they change every step, and its memory is better spent on micro-batches.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from megamem.kernels.autograd_kernel import AutogradKernel

SOURCE_DIR = Path(__file__).with_name("cpu")
SOURCES = sorted(SOURCE_DIR.glob("*.cpp"))
HEADERS = sorted(SOURCE_DIR.glob("*.h"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)    # computed in float32 inside; others take the reference
PACKED = "_megamem_packed"      # attribute of a marked tables tensor: None, or (what it was packed from, packed copy)


@functools.cache
def extension():
    from torch.utils.cpp_extension import load

    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "") \
        if Path("/proc/cpuinfo").exists() else ""
    digest = hashlib.sha256(flags.encode())
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    name = "megamem_cpu_memory_layer_" + digest.hexdigest()[:10]
    return load(name=name, sources=[str(path) for path in SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
                extra_ldflags=["-fopenmp"], verbose=False)


def keep_packed(tables: torch.Tensor, keep: bool = True) -> None:
    """Marks `tables` [K, R, D] for a kept packed copy (see the module's docstring), or unmarks them and drops
    their copy."""
    if keep and not hasattr(tables, PACKED):
        setattr(tables, PACKED, None)
    elif not keep and hasattr(tables, PACKED):
        delattr(tables, PACKED)


def _packed_copy(tables: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """The packed copy of marked tables, made again if they changed; None for unmarked tables or a call that reads
    rows in place."""
    if not hasattr(tables, PACKED) or extension().reads_in_place(tokens, tables.shape[1]):
        return None
    source = (tables.data_ptr(), tables._version, tables.dtype, tables.shape)
    kept = getattr(tables, PACKED)
    if kept is None or kept[0] != source:
        setattr(tables, PACKED, None)                   # the old copy goes before the new one is made
        kept = (source, extension().pack_tables(tables))
        setattr(tables, PACKED, kept)
    return kept[1]


def _hash(x, tau: int, temperature: float, weighting: str):
    """(codes, p) of x, and the flat x and p the backward reads."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    codes, p = extension().hash(x2, tau, temperature, weighting == "l1")
    lead = x.shape[:-1]
    return (codes.reshape(*lead, codes.shape[-1]), p.reshape(*lead, p.shape[-1])), (x2, p)


class _Hash(torch.autograd.Function):
    @staticmethod
    def compute(x, tau: int, temperature: float, weighting: str):
        return _hash(x, tau, temperature, weighting)[0]

    @staticmethod
    def forward(ctx, x, tau: int, temperature: float, weighting: str):
        (codes, p), saved = _hash(x, tau, temperature, weighting)
        ctx.save_for_backward(*saved)
        ctx.settings = (tau, temperature, weighting == "l1", x.shape)
        ctx.mark_non_differentiable(codes)
        return codes, p

    @staticmethod
    def backward(ctx, _dcodes, dp):
        x2, p = ctx.saved_tensors
        tau, temperature, l1, shape = ctx.settings
        dx = extension().hash_backward(x2, p, dp.reshape(p.shape).float().contiguous(), tau, temperature, l1)
        return dx.reshape(shape), None, None, None


def _gather_sum(codes, p, tables, bias):
    """y, and the flat codes and p and the tables the backward reads."""
    chunks, _, width = tables.shape
    codes2 = codes.reshape(-1, chunks).to(torch.int16).contiguous()      # codes from another kernel too
    p2 = p.reshape(-1, chunks).float().contiguous()
    tables = tables.contiguous()
    y = extension().gather_sum(codes2, p2, tables, bias.contiguous() if bias is not None else None,
                               _packed_copy(tables, codes2.shape[0]))
    return y.reshape(*codes.shape[:-1], width), (codes2, p2, tables)


class _GatherSum(torch.autograd.Function):
    @staticmethod
    def compute(codes, p, tables, bias):
        return _gather_sum(codes, p, tables, bias)[0]

    @staticmethod
    def forward(ctx, codes, p, tables, bias):
        y, saved = _gather_sum(codes, p, tables, bias)
        ctx.save_for_backward(*saved)
        ctx.shapes = (p.shape, p.dtype, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        codes2, p2, tables = ctx.saved_tensors
        p_shape, p_dtype, has_bias = ctx.shapes
        dy2 = dy.reshape(-1, tables.shape[-1]).to(tables.dtype).contiguous()
        dtables, dp = extension().gather_sum_backward(dy2, codes2, p2, tables)
        dbias = dy2.float().sum(0).to(tables.dtype) if has_bias else None
        return None, dp.reshape(p_shape).to(p_dtype), dtables, dbias


CpuKernel = AutogradKernel("cpu", _Hash, _GatherSum)
