"""The exchange of hashed chunks: a Memory Layer under tensor parallelism ships a
token's codes and p (K small numbers), never its activation (docs/parallel.md, "Tensor parallelism").

Codes travel as their narrowest integer, one byte up to 8 bits and two up to 15
(sent as raw bytes: gloo has no int16), and carry no gradient. p travels in
`p_dtype` (fp32, or fp16 to halve those bytes: fp16 keeps 11 significant bits at
any magnitude in its range, and p lies in [2^-tau, 1), or that times the chunk's
L1 norm with l1 weighting) and is handed on in fp32; its gradient travels back the
same way.
Hashing happens once, where the tokens (or the chunks) live, so every rank that
uses a code uses the same bits.
"""
from __future__ import annotations

import torch

from megamem.parallel.mappings import TensorParallelGroup, all_gather, all_to_all

P_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def code_dtype(bits: int) -> torch.dtype:
    """The integer codes of `bits` bits travel in."""
    return torch.uint8 if bits <= 8 else torch.int16


def _wire_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes.to(code_dtype(bits)).contiguous().view(torch.uint8)


def _unwire_codes(raw: torch.Tensor, bits: int) -> torch.Tensor:
    return raw if bits <= 8 else raw.view(torch.int16)


def gather_hashed(hashed: tuple[torch.Tensor, torch.Tensor], dim: int, bits: int, tp: TensorParallelGroup,
                  p_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's codes and p, concatenated along `dim` (tokens, or chunks for ML2)."""
    codes, p = hashed
    if tp.size == 1:
        return codes, p
    codes = _unwire_codes(all_gather(_wire_codes(codes, bits), dim, tp), bits)
    return codes, all_gather(p.to(P_DTYPES[p_dtype]), dim, tp).float()


def route_hashed(hashed: tuple[torch.Tensor, torch.Tensor], token_dim: int, bits: int, tp: TensorParallelGroup,
                 p_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's codes and p to the rank that owns its table, for all tokens (TorchRec's table-wise input
    distribution): [B, S/tp, K] on each rank -> [B, S, K/tp]."""
    codes, p = hashed
    if tp.size == 1:
        return codes, p
    codes = _unwire_codes(all_to_all(_wire_codes(codes, bits), -1, token_dim, tp), bits)
    return codes, all_to_all(p.to(P_DTYPES[p_dtype]), -1, token_dim, tp).float()
