"""One split's token stream cut into samples of seq_len + 1 tokens, written as shards as they fill.

Documents are joined end to end, so a sample runs across document boundaries and
a shard's contents depend only on the stream before it: the same stream gives the
same shards however it was fed (megamem preprocess in one task, or the merge of
many). Its pending tokens can be saved and restored for a resumable run.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from megamem.data_tools.shards import ShardInfo, shard_name, write_shard
from megamem.errors import DataError


class Packer:
    """Cuts one split's token stream into samples of seq_len + 1 tokens and writes full shards."""

    def __init__(self, split: str, directory: Path, sample_len: int, samples_per_shard: int, dtype: np.dtype):
        self.split, self.directory, self.sample_len = split, directory, sample_len
        self.samples_per_shard, self.dtype = samples_per_shard, dtype
        self.shards: list[ShardInfo] = []
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.dropped_tokens = 0

    def _pending_path(self, documents: int) -> Path:
        return self.directory / f".pending-{self.split}-{documents}.npy"

    @property
    def samples_written(self) -> int:
        return sum(s.samples for s in self.shards)

    def feed(self, tokens: np.ndarray) -> bool:
        """Add tokens; write every shard that fills. True if a shard was written."""
        self.pending.append(tokens.astype(self.dtype, copy=False))
        self.pending_tokens += len(tokens)
        shard_tokens = self.samples_per_shard * self.sample_len
        wrote = False
        while self.pending_tokens >= shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[:shard_tokens].reshape(-1, self.sample_len))
            self.pending, self.pending_tokens = [stream[shard_tokens:]], len(stream) - shard_tokens
            wrote = True
        return wrote

    def finish(self) -> None:
        """Write the last, shorter shard; tokens short of one sample are dropped and counted."""
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        full = len(stream) // self.sample_len * self.sample_len
        if full:
            self._write(stream[:full].reshape(-1, self.sample_len))
        self.dropped_tokens += len(stream) - full
        self.pending, self.pending_tokens = [], 0

    def _write(self, samples: np.ndarray) -> None:
        self.shards.append(write_shard(self.directory, shard_name(self.split, len(self.shards)), self.samples_written,
                                       samples))

    def save(self, documents: int) -> dict:
        """Write the pending tokens under a name of their own; the state file, written after, points at it."""
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        path = self._pending_path(documents)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, stream, allow_pickle=False)
        tmp.replace(path)
        return {"shards": [asdict(s) for s in self.shards], "pending": path.name, "pending_tokens": len(stream)}

    def restore(self, state: dict) -> None:
        self.shards = [ShardInfo(**s) for s in state["shards"]]
        path = self.directory / state["pending"]
        pending = np.load(path, allow_pickle=False) if path.exists() else None
        if pending is None or len(pending) != state["pending_tokens"]:
            raise DataError(f"{path} does not match the saved position of {self.directory}. Fix: delete "
                            f"{self.directory} and start again")
        self.pending, self.pending_tokens = [pending], len(pending)
