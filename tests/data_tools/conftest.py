"""Small corpora written on the fly."""
from __future__ import annotations

import json
import random

import pytest

LETTERS = "abcdefghijklmnopqrstuvwxyz      "


def documents(n: int, seed: int = 0) -> list[str]:
    """Random letters and spaces: every window of a dozen tokens is unique, so a sample identifies itself."""
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(20, 400))) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """A jsonl file of 600 documents; returns (path, documents)."""
    docs = documents(600)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs
