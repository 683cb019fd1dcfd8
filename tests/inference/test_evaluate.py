"""megamem eval: a run's own validation split gives its logged valid_loss, from the run, a checkpoint or an export;
bits per byte by hand; bad inputs named."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megamem.data_tools.tokenizer import ByteTokenizer
from megamem.inference.evaluate import evaluate
from megamem.inference.load import load_trained
from megamem.kernels.cpu_kernel import PACKED
from megamem.model import build_model
from megamem.model.memory_layer import MemoryLayer
from tests.training.runs import STRAIGHT_STEPS, losses


def test_eval_of_a_run_is_its_logged_validation_loss(shards, trained, tmp_path, megamem):
    logged = losses(trained, "valid_loss")[STRAIGHT_STEPS]
    export = tmp_path / "model.safetensors"
    assert megamem("export", str(trained), "--output", str(export))[0] == 0
    for source in (trained, trained / "checkpoints" / f"step-{STRAIGHT_STEPS:08d}", export):
        status, out, err = megamem("eval", str(source), "--data", str(shards), "--json")
        assert status == 0, err[-2000:]
        got = json.loads(out)
        assert set(got) == {"loss", "perplexity", "bits_per_token", "bits_per_byte", "tokens"}
        assert got["loss"] == pytest.approx(logged, rel=1e-6), source
        assert got["tokens"] == 4 * 8 * 128 and got["bits_per_token"] == pytest.approx(got["loss"] / math.log(2))
    status, out, _ = megamem("eval", str(trained), "--data", str(shards), "--split", "train", "--max-batches", "2")
    assert status == 0 and "bits per byte" in out and "1,024 tokens" in out, out


def test_a_loaded_model_keeps_its_packed_tables_and_a_built_one_does_not(trained):
    """Inference marks every table for the CPU kernel's kept packed copy; training, whose tables change every
    step, does not pay its memory."""
    trained_model = load_trained(trained, kernel="cpu")
    tables = [m.tables for m in trained_model.model.modules() if isinstance(m, MemoryLayer)]
    assert tables and all(hasattr(t, PACKED) and getattr(t, PACKED) is None for t in tables)
    with torch.no_grad():
        trained_model.model(torch.zeros(16, 128, dtype=torch.long))      # more tokens than rows
    assert all(getattr(t, PACKED) is not None for t in tables)
    built = build_model(trained_model.config)
    assert not any(hasattr(m.tables, PACKED) for m in built.modules() if isinstance(m, MemoryLayer))


class Uniform(torch.nn.Module):
    """The same logits for every token: the loss is ln(vocabulary) whatever the text."""

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, 257)


def test_bits_per_byte_by_hand():
    tokenizer = ByteTokenizer()
    text = "héllo wörld"                                      # 11 characters, 13 bytes
    batch = torch.from_numpy(np.concatenate([tokenizer.encode(text), [tokenizer.eod_id]]))[None]
    result = evaluate(Uniform(), [batch], tokenizer.token_bytes(), torch.device("cpu"))
    # targets: every token but the first, i.e. 12 bytes of text and the end-of-document token (no bytes)
    assert result.tokens == 13 and result.loss == pytest.approx(math.log(257))
    assert result.bits_per_byte == pytest.approx(13 * math.log2(257) / 12)


def test_bad_inputs_are_named(shards, trained, tmp_path, megamem):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((trained / "config.yaml").read_text())
    for argv, message in (([str(tmp_path / "nope"), "--data", str(shards)], "is not a run directory"),
                          ([str(empty), "--data", str(shards)], "has no complete checkpoint"),
                          ([str(trained), "--data", str(tmp_path / "no-data")], "no dataset at"),
                          ([str(trained), "--data", str(shards), "--max-batches", "0"],
                           "--max-batches must be at least 1")):
        status, _, err = megamem("eval", *argv)
        assert status == 2 and message in err and "Traceback" not in err, err
