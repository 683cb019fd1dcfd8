"""Triton Memory Layer: fused hash, weight and gather-sum, and its backward (docs/model.md, "The Memory Layer").

Shapes: N tokens, K chunks (tables), T = tau bits, R = 2^tau rows, D = d_out.
Forward: a program owns BLOCK_N tokens x BLOCK_D output columns and walks the K
tables, hashing each chunk (sign bits -> code, p in fp32 from log-sigmoids),
gathering rows and accumulating in fp32; y is written in the activation dtype.
Codes (uint8 for tau <= 8, int16 above) and p are saved for backward.
Backward: dp[n, k] = <dy[n], T_k[code]> and dx from p's derivative, per token
block; table gradients in fp32 by a deterministic segment reduction: (table,
row) keys are sorted stably, and a program sums a block of keys' segments side
by side, each in token order (no float atomics; `atomic=True` is the comparison
path). Runs compiled on CUDA and, with TRITON_INTERPRET=1 set before this module
is imported, on CPU tensors, with the same block sizes either way (BLOCKS): the
interpreter's tests run the tiling that ships.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megamem.kernels.autograd_kernel import AutogradKernel


@triton.jit
def _hash_chunk(x_ptr, rows, row_mask, k, d_in, scale, TAU: tl.constexpr, TAU_P2: tl.constexpr, L1: tl.constexpr):
    """Code and p of chunk k for a block of tokens."""
    bits = tl.arange(0, TAU_P2)
    bit_mask = bits < TAU
    z = tl.load(x_ptr + rows[:, None] * d_in + k * TAU + bits[None, :], mask=row_mask[:, None] & bit_mask[None, :],
                other=0.0).to(tl.float32)
    code = tl.sum(tl.where((z >= 0) & bit_mask[None, :], 1 << bits[None, :], 0), axis=1)
    a = tl.abs(z) * scale
    log_sig = -tl.log(1.0 + tl.exp(-a))                       # log sigmoid(2|z|/t), exact for a >= 0
    p = tl.exp(tl.sum(tl.where(bit_mask[None, :], log_sig, 0.0), axis=1))
    if L1:
        p = p * tl.sum(tl.abs(z), axis=1)
    return code, p


@triton.jit
def _hash_kernel(x_ptr, codes_ptr, p_ptr, n_tokens, scale, K: tl.constexpr, TAU: tl.constexpr, TAU_P2: tl.constexpr,
                 L1: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes and p of one chunk for a block of tokens, for layers that share them."""
    pid_n, k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    code, p = _hash_chunk(x_ptr, rows, row_mask, k, K * TAU, scale, TAU, TAU_P2, L1)
    tl.store(codes_ptr + rows * K + k, code.to(codes_ptr.dtype.element_ty), mask=row_mask)
    tl.store(p_ptr + rows * K + k, p, mask=row_mask)


@triton.jit
def _forward_kernel(x_ptr, codes_ptr, p_ptr, tables_ptr, bias_ptr, y_ptr, n_tokens, d_out, scale,
                    K: tl.constexpr, R: tl.constexpr, TAU: tl.constexpr, TAU_P2: tl.constexpr, HASH: tl.constexpr,
                    L1: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask, col_mask = rows < n_tokens, cols < d_out
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k in range(K):
        if HASH:
            code, p = _hash_chunk(x_ptr, rows, row_mask, k, K * TAU, scale, TAU, TAU_P2, L1)
            if pid_d == 0:
                tl.store(codes_ptr + rows * K + k, code.to(codes_ptr.dtype.element_ty), mask=row_mask)
                tl.store(p_ptr + rows * K + k, p, mask=row_mask)
        else:
            code = tl.load(codes_ptr + rows * K + k, mask=row_mask, other=0).to(tl.int32)
            p = tl.load(p_ptr + rows * K + k, mask=row_mask, other=0.0)
        row_ptr = tables_ptr + (k * R + code.to(tl.int64))[:, None] * d_out + cols[None, :]
        values = tl.load(row_ptr, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        acc += p[:, None] * values
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * d_out + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _dp_kernel(dy_ptr, codes_ptr, tables_ptr, dp_ptr, n_tokens, d_out,
               K: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dp[n, k] = <dy[n, :], tables[k, codes[n, k], :]> for a block of tokens and one table."""
    pid_n, k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    code = tl.load(codes_ptr + rows * K + k, mask=row_mask, other=0).to(tl.int64)
    dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, d_out, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < d_out)[None, :]
        g = tl.load(dy_ptr + rows[:, None] * d_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(tables_ptr + (k * R + code)[:, None] * d_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(g * t, axis=1)
    tl.store(dp_ptr + rows * K + k, dot, mask=row_mask)


@triton.jit
def _dx_kernel(x_ptr, p_ptr, dp_ptr, dx_ptr, n_tokens, scale, K: tl.constexpr, TAU: tl.constexpr,
               TAU_P2: tl.constexpr, L1: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz_i = dp * p * (2/t) sign(z_i) (1 - sigmoid(2|z_i|/t)); l1: dp * sign(z_i) p0 ((2/t)(1 - s_i) m + 1)."""
    pid_n, k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bits = tl.arange(0, TAU_P2)
    row_mask, bit_mask = rows < n_tokens, bits < TAU
    mask = row_mask[:, None] & bit_mask[None, :]
    offsets = rows[:, None] * (K * TAU) + k * TAU + bits[None, :]
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + rows * K + k, mask=row_mask, other=0.0)
    g = tl.load(dp_ptr + rows * K + k, mask=row_mask, other=0.0)
    sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
    rest = 1.0 - 1.0 / (1.0 + tl.exp(-scale * tl.abs(z)))
    if L1:
        magnitude = tl.sum(tl.abs(z), axis=1)
        p0 = tl.where(magnitude > 0, p / tl.where(magnitude > 0, magnitude, 1.0), 0.0)
        slope = p0[:, None] * (scale * rest * magnitude[:, None] + 1.0)
    else:
        slope = p[:, None] * scale * rest
    tl.store(dx_ptr + offsets, (g[:, None] * sign * slope).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _table_grad_segments_kernel(dy_ptr, p_ptr, order_ptr, starts_ptr, dtables_ptr, total_rows, d_out,
                                K: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dtables[key, cols] = sum over the key's segment of sorted (token, table) pairs, in token order, for a block
    of keys at once: step j adds every key's j-th pair, so each row's sum runs in the order of its own segment
    (and the lanes of a key whose segment has ended add nothing)."""
    pid, pid_d = tl.program_id(0), tl.program_id(1)
    keys = pid * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    key_mask = keys < total_rows
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d_out
    start = tl.load(starts_ptr + keys, mask=key_mask, other=0)
    length = tl.load(starts_ptr + keys + 1, mask=key_mask, other=0) - start
    acc = tl.zeros((BLOCK_KEYS, BLOCK_D), dtype=tl.float32)
    for j in range(0, tl.max(length, axis=0)):
        live = j < length
        pair = tl.load(order_ptr + start + j, mask=live, other=0)             # flat index n * K + k
        weight = tl.load(p_ptr + pair, mask=live, other=0.0)
        n = pair // K
        rows = tl.load(dy_ptr + n[:, None] * d_out + cols[None, :], mask=live[:, None] & col_mask[None, :],
                       other=0.0).to(tl.float32)
        acc += weight[:, None] * rows
    tl.store(dtables_ptr + keys[:, None].to(tl.int64) * d_out + cols[None, :], acc,
             mask=key_mask[:, None] & col_mask[None, :])


@triton.jit
def _table_grad_atomic_kernel(dy_ptr, codes_ptr, p_ptr, dtables_ptr, n_tokens, d_out,
                              K: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < n_tokens)[:, None] & (cols < d_out)[None, :]
    g = tl.load(dy_ptr + rows[:, None] * d_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    for k in range(K):
        code = tl.load(codes_ptr + rows * K + k, mask=rows < n_tokens, other=0).to(tl.int64)
        p = tl.load(p_ptr + rows * K + k, mask=rows < n_tokens, other=0.0)
        tl.atomic_add(dtables_ptr + (k * R + code)[:, None] * d_out + cols[None, :], p[:, None] * g, mask=mask)


ATOMIC_TABLE_GRADIENTS = False    # True: float atomics for table gradients (faster, not bit-reproducible)
BLOCKS = {"BLOCK_N": 64, "BLOCK_D": 64}     # tokens x output columns per program, compiled and interpreted alike
KEYS_PER_PROGRAM = 32                       # (table, row) keys a table-gradient program sums at once


def _code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int16


def forward(x2, codes, p, tables, bias, tau: int, temperature: float, l1: bool, hash_input: bool):
    """y for x2 [N, K tau] (hash_input) or for given codes and p [N, K]; fills codes and p when hashing."""
    n_tokens = codes.shape[0]
    chunks, rows, d_out = tables.shape
    y = torch.empty(n_tokens, d_out, device=tables.device, dtype=tables.dtype)
    blocks = BLOCKS
    grid = (triton.cdiv(n_tokens, blocks["BLOCK_N"]), triton.cdiv(d_out, blocks["BLOCK_D"]))
    _forward_kernel[grid](x2 if hash_input else p, codes, p, tables, bias if bias is not None else tables, y, n_tokens,
                          d_out, 2.0 / temperature, K=chunks, R=rows, TAU=tau, TAU_P2=triton.next_power_of_2(tau),
                          HASH=hash_input, L1=l1, HAS_BIAS=bias is not None, **blocks)
    return y


def backward(dy, x2, codes, p, tables, tau: int, temperature: float, l1: bool, need_dx: bool, atomic: bool = False):
    """(dx or None, dp, dtables fp32)."""
    n_tokens = codes.shape[0]
    chunks, rows, d_out = tables.shape
    blocks = BLOCKS
    dp = torch.empty(n_tokens, chunks, device=dy.device, dtype=torch.float32)
    _dp_kernel[(triton.cdiv(n_tokens, blocks["BLOCK_N"]), chunks)](dy, codes, tables, dp, n_tokens, d_out,
                                                                   K=chunks, R=rows, **blocks)
    dtables = torch.zeros(chunks, rows, d_out, device=dy.device, dtype=torch.float32)
    if atomic:
        grid = (triton.cdiv(n_tokens, blocks["BLOCK_N"]), triton.cdiv(d_out, blocks["BLOCK_D"]))
        _table_grad_atomic_kernel[grid](dy, codes, p, dtables, n_tokens, d_out, K=chunks, R=rows, **blocks)
    else:
        keys = (codes.long() + torch.arange(chunks, device=codes.device) * rows).reshape(-1)     # per (n, k) pair
        order = torch.sort(keys, stable=True).indices                                           # token order per key
        starts = torch.zeros(chunks * rows + 1, device=codes.device, dtype=torch.int64)
        starts[1:] = torch.cumsum(torch.bincount(keys, minlength=chunks * rows), 0)
        grid = (triton.cdiv(chunks * rows, KEYS_PER_PROGRAM), triton.cdiv(d_out, blocks["BLOCK_D"]))
        _table_grad_segments_kernel[grid](dy, p, order, starts, dtables, chunks * rows, d_out, K=chunks,
                                          BLOCK_KEYS=KEYS_PER_PROGRAM, BLOCK_D=blocks["BLOCK_D"])
    dx = None
    if need_dx:
        dx = torch.empty_like(x2)
        _dx_kernel[(triton.cdiv(n_tokens, blocks["BLOCK_N"]), chunks)](x2, p, dp, dx, n_tokens, 2.0 / temperature,
                                                                       K=chunks, TAU=tau,
                                                                       TAU_P2=triton.next_power_of_2(tau),
                                                                       L1=l1, BLOCK_N=blocks["BLOCK_N"])
    return dx, dp, dtables


class _Hash(torch.autograd.Function):
    """x -> (codes, p) for layers that share one hashing; backward gives dx from dp."""

    @staticmethod
    def forward(ctx, x, tau: int, temperature: float, weighting: str):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        chunks = x2.shape[1] // tau
        codes = torch.empty(x2.shape[0], chunks, device=x.device, dtype=_code_dtype(tau))
        p = torch.empty(x2.shape[0], chunks, device=x.device, dtype=torch.float32)
        _hash_only(x2, codes, p, tau, temperature, weighting == "l1")
        ctx.save_for_backward(x2, p)
        ctx.settings = (tau, temperature, weighting == "l1", x.shape)
        ctx.mark_non_differentiable(codes)
        return codes.reshape(*x.shape[:-1], chunks), p.reshape(*x.shape[:-1], chunks)

    @staticmethod
    def backward(ctx, _dcodes, dp):
        x2, p = ctx.saved_tensors
        tau, temperature, l1, shape = ctx.settings
        dx = torch.empty_like(x2)
        n_tokens, chunks = p.shape
        block = BLOCKS["BLOCK_N"]
        _dx_kernel[(triton.cdiv(n_tokens, block), chunks)](x2, p, dp.reshape(p.shape).float().contiguous(),
                                                           dx, n_tokens,
                                                           2.0 / temperature, K=chunks, TAU=tau,
                                                           TAU_P2=triton.next_power_of_2(tau), L1=l1, BLOCK_N=block)
        return dx.reshape(shape), None, None, None


def _hash_only(x2, codes, p, tau, temperature, l1):
    n_tokens, chunks = codes.shape
    block = BLOCKS["BLOCK_N"]
    _hash_kernel[(triton.cdiv(n_tokens, block), chunks)](x2, codes, p, n_tokens, 2.0 / temperature, K=chunks, TAU=tau,
                                                         TAU_P2=triton.next_power_of_2(tau), L1=l1, BLOCK_N=block)


class _GatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, p, tables, bias):
        chunks = tables.shape[0]
        codes2 = codes.reshape(-1, chunks).contiguous()
        p2 = p.reshape(-1, chunks).float().contiguous()
        tables = tables.contiguous()
        y = forward(None, codes2, p2, tables, bias, 1, 1.0, False, hash_input=False)
        ctx.save_for_backward(codes2, p2, tables)
        ctx.shapes = (p.shape, p.dtype, bias is not None)
        return y.reshape(*codes.shape[:-1], tables.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        codes2, p2, tables = ctx.saved_tensors
        p_shape, p_dtype, has_bias = ctx.shapes
        dy2 = dy.reshape(-1, tables.shape[-1]).contiguous()
        _, dp, dtables = backward(dy2, None, codes2, p2, tables, 1, 1.0, False, need_dx=False,
                                  atomic=ATOMIC_TABLE_GRADIENTS)
        dbias = dy2.float().sum(0).to(tables.dtype) if has_bias else None
        return None, dp.reshape(p_shape).to(p_dtype), dtables.to(tables.dtype), dbias


class _HashGatherSum(torch.autograd.Function):
    """The fused path: one kernel hashes, weighs and gathers; codes and p are kept for backward and returned."""

    @staticmethod
    def forward(ctx, x, tables, bias, tau: int, temperature: float, weighting: str):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        chunks = tables.shape[0]
        codes = torch.empty(x2.shape[0], chunks, device=x.device, dtype=_code_dtype(tau))
        p = torch.empty(x2.shape[0], chunks, device=x.device, dtype=torch.float32)
        tables = tables.contiguous()
        y = forward(x2, codes, p, tables, bias, tau, temperature, weighting == "l1", hash_input=True)
        ctx.save_for_backward(x2, codes, p, tables)
        ctx.settings = (tau, temperature, weighting == "l1", x.shape, bias is not None)
        ctx.mark_non_differentiable(codes, p)
        lead = x.shape[:-1]
        return y.reshape(*lead, tables.shape[-1]), codes.reshape(*lead, chunks), p.reshape(*lead, chunks)

    @staticmethod
    def backward(ctx, dy, _dcodes, _dp):
        x2, codes, p, tables = ctx.saved_tensors
        tau, temperature, l1, shape, has_bias = ctx.settings
        dy2 = dy.reshape(-1, tables.shape[-1]).contiguous()
        dx, _, dtables = backward(dy2, x2, codes, p, tables, tau, temperature, l1, need_dx=True,
                                  atomic=ATOMIC_TABLE_GRADIENTS)
        dbias = dy2.float().sum(0).to(tables.dtype) if has_bias else None
        return dx.reshape(shape), dtables.to(tables.dtype), dbias, None, None, None


TritonKernel = AutogradKernel("triton", _Hash, _GatherSum, _HashGatherSum)
