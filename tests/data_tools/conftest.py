"""Small corpora written on the fly."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

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


def kill_once_saved(command: list[str], saved: Path, linger: float = 0.3) -> None:
    """Run `command` in a process group of its own and SIGKILL the group `linger` s after `saved` (a resume state
    file) first appears, as a crash would."""
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(linger)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
