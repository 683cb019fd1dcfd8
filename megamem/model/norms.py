"""LayerNorm and RMSNorm, apex's fused versions when apex is importable.

GPU clusters build apex from source for its fused norms; everywhere else torch's
own norms are used. The choice is logged once per process so a slow run on a
cluster without apex is easy to explain.
"""
from __future__ import annotations

import functools
import importlib
import logging

from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def _apex_norms():
    try:
        module = importlib.import_module("apex.normalization")
        fused = (module.FusedLayerNorm, module.FusedRMSNorm)
    except (ImportError, AttributeError):
        log.info("norms: apex.normalization not importable, using torch.nn.LayerNorm / RMSNorm")
        return None
    log.info("norms: using apex FusedLayerNorm / FusedRMSNorm")
    return fused


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    fused = _apex_norms()
    if kind == "layernorm":
        return fused[0](dim, eps=eps) if fused else nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return fused[1](dim, eps=eps) if fused else nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; use 'layernorm' or 'rmsnorm'")
