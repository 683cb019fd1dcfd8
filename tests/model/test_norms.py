"""Norm selection: apex's fused norms when importable, torch's otherwise, logged once."""
from __future__ import annotations

import importlib
import logging
import types

import pytest
from torch import nn

from megamem.model import norms


@pytest.fixture(autouse=True)
def fresh_choice():
    norms._apex_norms.cache_clear()
    yield
    norms._apex_norms.cache_clear()


def test_falls_back_to_torch_without_apex(monkeypatch, caplog):
    real_import = importlib.import_module

    def no_apex(name, *args):
        if name.startswith("apex"):
            raise ImportError("no apex here")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_apex)
    with caplog.at_level(logging.INFO, logger="megamem.model.norms"):
        assert isinstance(norms.make_norm("layernorm", 8, 1e-5), nn.LayerNorm)
        assert isinstance(norms.make_norm("rmsnorm", 8, 1e-5), nn.RMSNorm)
    assert [r.message for r in caplog.records].count(
        "norms: apex.normalization not importable, using torch.nn.LayerNorm / RMSNorm") == 1


def test_uses_apex_when_importable(monkeypatch):
    class FusedLayerNorm(nn.LayerNorm):
        """Stands in for apex.normalization.FusedLayerNorm."""

    class FusedRMSNorm(nn.RMSNorm):
        """Stands in for apex.normalization.FusedRMSNorm."""

    fake = types.SimpleNamespace(FusedLayerNorm=FusedLayerNorm, FusedRMSNorm=FusedRMSNorm)
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: fake)
    assert type(norms.make_norm("layernorm", 8, 1e-5)) is FusedLayerNorm
    assert type(norms.make_norm("rmsnorm", 8, 1e-5)) is FusedRMSNorm


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        norms.make_norm("batchnorm", 8, 1e-5)
