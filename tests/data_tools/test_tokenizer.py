"""Byte-level and BPE tokenizers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megamem.cli.main import main
from megamem.data_tools.tokenizer import ByteTokenizer, load_tokenizer, token_dtype
from megamem.errors import DataError


def test_byte_tokenizer_round_trips_utf8():
    tokenizer = load_tokenizer("byte")
    text = "héllo wörld ✓"
    ids = tokenizer.encode(text)
    assert ids.max() < 256 and tokenizer.decode(ids) == text
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (257, 256)
    assert tokenizer.hash == ByteTokenizer().hash


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_train_tokenizer_command_makes_a_loadable_bpe(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def function_{i}(x):\n    return x * {i}\n"}) + "\n"
                              for i in range(300)))
    out = tmp_path / "tok.json"
    assert main(["train-tokenizer", "--input", str(corpus), "--vocab-size", "400", "--output", str(out)]) == 0
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.kind == "huggingface" and tokenizer.eod_id == 0 and tokenizer.vocab_size <= 400
    assert tokenizer.eod_token == "<|endoftext|>"           # named in a Hugging Face export's tokenizer_config
    ids = tokenizer.encode("def function_7(x):")
    assert tokenizer.decode(ids) == "def function_7(x):" and len(ids) < len("def function_7(x):")


def test_missing_and_invalid_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found: nope.json"):
        load_tokenizer("nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match=r"is not a valid tokenizer\.json"):
        load_tokenizer(str(bad))
