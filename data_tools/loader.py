"""The training data loader: deterministic, data-parallel, resumable, blended.

Order. Each dataset's epoch e is a permutation of its samples drawn from
(seed, dataset, e): shards in a shuffled order, samples shuffled within each
shard; epochs follow one another without a gap.

Data parallelism. As in Megatron, the global sample order is cut into slots of
one micro-batch, and data-parallel rank r takes slots r, r + dp, r + 2 dp, ...:
its k-th micro-batch is slot k dp + r. So an optimizer step always trains on the
same consecutive samples whatever the split into ranks and accumulation steps,
replicas never share a sample, and together they cover every epoch. The rank
comes from the parallel state, never from the environment: every tensor- and
pipeline-parallel rank of one replica reads exactly the same samples.

Blending. Positions are grouped in blocks of BLEND_BLOCK; every block takes the
same number of samples from each dataset (weights rounded by largest remainder)
in the same interleaved pattern, so the dataset and its own position behind any
global position are O(1) arithmetic, which is what makes resuming exact.

Workers. Batch b holds positions [b B, (b + 1) B). DataLoader worker w builds
batches w, w + W, ... and the DataLoader hands them out round-robin, so the batch
sequence is the same for any worker count. The position (batches consumed) is
the loader's whole state: a resumed run sees exactly the batches an
uninterrupted run would have.
"""
from __future__ import annotations

import atexit
import hashlib
from itertools import count

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megamem.data_tools.shards import Manifest, read_shard
from megamem.errors import DataError
from megamem.stop_signals import ignore_stop_signals, stop_signals_held

BLEND_BLOCK = 4096


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]))


class DatasetOrder:
    """Where the q-th sample of one dataset's endless sequence of epochs lives."""

    def __init__(self, manifest: Manifest, split: str, seed: int, index: int, shuffle: bool):
        self.manifest, self.seed, self.index, self.shuffle = manifest, seed, index, shuffle
        self.shards = manifest.shards if split == "train" else manifest.valid_shards
        self.samples = sum(s.samples for s in self.shards)
        if self.samples == 0:
            raise DataError(f"dataset {manifest.directory} has no {split} samples. Fix: preprocess more data"
                            + (" or a larger --valid-fraction" if split == "valid" else ""))
        self._epoch: int | None = None

    def locate(self, q: int) -> tuple[int, int, int]:
        """(epoch, shard, row in the shard's shuffled order) of the q-th sample."""
        epoch, position = divmod(q, self.samples)
        if epoch != self._epoch:
            self._epoch = epoch
            self.shard_order = _rng(self.seed, self.index, epoch).permutation(len(self.shards)) if self.shuffle \
                else np.arange(len(self.shards))
            self.ends = np.cumsum([self.shards[s].samples for s in self.shard_order])
        slot = int(np.searchsorted(self.ends, position, side="right"))
        shard = int(self.shard_order[slot])
        offset = position - (int(self.ends[slot - 1]) if slot else 0)
        return epoch, shard, offset

    def row_order(self, epoch: int, shard: int) -> np.ndarray:
        n = self.shards[shard].samples
        return _rng(self.seed, self.index, epoch, shard + 1).permutation(n) if self.shuffle else np.arange(n)


def blend_pattern(weights: list[float], block: int = BLEND_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each slot in a block, count of each dataset before each slot [block + 1, D])."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights) * block
    counts = np.floor(share).astype(np.int64)
    for d in np.argsort(-(share - counts), kind="stable")[: block - counts.sum()]:
        counts[d] += 1
    placed = np.zeros(len(weights), dtype=np.int64)
    pattern = np.empty(block, dtype=np.int64)
    before = np.zeros((block + 1, len(weights)), dtype=np.int64)
    for slot in range(block):
        d = int(np.argmax((slot + 1) * counts / block - placed))
        pattern[slot] = d
        placed[d] += 1
        before[slot + 1] = placed
    return pattern, before


class TokenBatches(IterableDataset):
    """Batches [B, seq_len + 1] of int64 tokens from `start_batch` on (forever, or `max_batches`)."""

    def __init__(self, manifests: list[Manifest], weights: list[float], split: str, batch_size: int, seed: int,
                 dp_rank: int, dp_size: int, start_batch: int = 0, max_batches: int | None = None):
        self.manifests, self.batch_size = manifests, batch_size
        self.start_batch, self.max_batches = start_batch, max_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        shuffle = split == "train"
        self.orders = [DatasetOrder(m, split, seed, i, shuffle) for i, m in enumerate(manifests)]
        self.pattern, self.before = blend_pattern(weights)
        self.block_counts = self.before[-1]
        self._cache: dict[int, tuple[tuple[int, int], np.ndarray]] = {}

    def source_of(self, position: int) -> tuple[int, int]:
        """(dataset, that dataset's own position) behind a global position."""
        block, slot = divmod(position, len(self.pattern))
        d = int(self.pattern[slot])
        return d, block * int(self.block_counts[d]) + int(self.before[slot, d])

    def sample(self, position: int) -> np.ndarray:
        d, q = self.source_of(position)
        order = self.orders[d]
        epoch, shard, offset = order.locate(q)
        key = (epoch, shard)
        cached = self._cache.get(d)
        if cached is None or cached[0] != key:
            rows = read_shard(self.manifests[d].directory, order.shards[shard], self.manifests[d].seq_len,
                              self.manifests[d].dtype)
            cached = (key, rows[order.row_order(epoch, shard)])
            self._cache[d] = cached
        return cached[1][offset]

    def batch(self, index: int) -> torch.Tensor:
        """This rank's index-th micro-batch: slot index x dp + rank of the global order."""
        first = (index * self.dp_size + self.dp_rank) * self.batch_size
        rows = np.stack([self.sample(p) for p in range(first, first + self.batch_size)])
        return torch.from_numpy(rows.astype(np.int64))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stop = None if self.max_batches is None else self.start_batch + self.max_batches
        for index in count(self.start_batch + worker, workers):
            if stop is not None and index >= stop:
                return
            yield self.batch(index)


class TrainLoader:
    """Iterator over training batches whose position is checkpointed (state_dict / load_state_dict)."""

    def __init__(self, manifests: list[Manifest], weights: list[float], batch_size: int, seed: int, dp_rank: int,
                 dp_size: int, num_workers: int):
        self.args = (manifests, weights, "train", batch_size, seed, dp_rank, dp_size)
        self.num_workers = num_workers
        self.dp_size = dp_size
        self.fingerprint = self._fingerprint(dp_size)
        self.batches = 0
        self._iterator = None
        self._closes_at_exit = False

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            dataset = TokenBatches(*self.args, start_batch=self.batches)
            with stop_signals_held():       # workers fork here, and must never die of the rank's stop signal
                self._iterator = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                 prefetch_factor=4 if self.num_workers else None,
                                                 worker_init_fn=ignore_stop_signals))
            if self.num_workers and not self._closes_at_exit:
                atexit.register(self.close)         # runs before multiprocessing's own exit handler, see close()
                self._closes_at_exit = True
        try:
            batch = next(self._iterator)
        except DataError as err:     # from a worker, its message carries the worker's traceback: keep the last line
            raise DataError(str(err).strip().splitlines()[-1].removeprefix("megamem.errors.DataError: ")) from None
        self.batches += 1
        return batch

    def close(self) -> None:
        """Stop the workers. They ignore SIGTERM, which is how multiprocessing's exit handler ends them before it
        waits for them: left running, they would hold the exit forever. So close() also runs at exit, registered
        after (hence run before) that handler."""
        if self._iterator is not None and hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()
        self._iterator = None

    def state_dict(self) -> dict:
        return {"batches": self.batches, "fingerprint": self.fingerprint}

    def _fingerprint(self, dp_size: int) -> str:
        """The same on every rank: the checkpoint keeps one position (batches consumed) for all of them. Names the
        data by its shards' checksums, not its directory, so a moved dataset still resumes."""
        manifests, weights, _, batch_size, seed, _, _ = self.args
        shards = [[s.sha256 for s in m.shards] for m in manifests]
        return hashlib.sha256(repr((shards, weights, batch_size, seed, dp_size)).encode()).hexdigest()

    def load_state_dict(self, state: dict, saved_dp_size: int | None = None) -> None:
        """`saved_dp_size`: the data-parallel size of the run that saved `state`, where it may differ from this
        one's (a resharded checkpoint). A global batch holds the same samples at any size, so the position is the
        same count of global micro-batches."""
        if saved_dp_size is not None and saved_dp_size != self.dp_size:
            consumed = state["batches"] * saved_dp_size
            if state["fingerprint"] == self._fingerprint(saved_dp_size) and consumed % self.dp_size == 0:
                state = {"batches": consumed // self.dp_size, "fingerprint": self.fingerprint}
        if state["fingerprint"] != self.fingerprint:
            raise DataError("the checkpoint's data position belongs to other datasets, weights, batch size, seed or "
                            "data-parallel layout; resuming would repeat or skip samples. Fix: resume with the same "
                            "data and layout, or start a new run")
        self.batches = state["batches"]
        self.close()


def valid_batches(manifests: list[Manifest], batch_size: int, dp_rank: int, dp_size: int, total_batches: int):
    """This rank's share of the first `total_batches` validation micro-batches (fewer if the split is smaller),
    in a fixed order: every evaluation, whatever the number of ranks, covers the same samples."""
    dataset = TokenBatches(manifests, [1.0] * len(manifests), "valid", batch_size, 0, dp_rank, dp_size)
    slots = min(total_batches, max(1, sum(order.samples for order in dataset.orders) // batch_size))
    dataset.max_batches = max(0, -(-(slots - dp_rank) // dp_size))      # this rank's slots k dp + rank < slots
    return iter(dataset)
