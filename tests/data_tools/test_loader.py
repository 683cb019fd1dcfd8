"""The training loader: order, resume, workers, blending, validation, bad shards."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megamem.data_tools.loader import TokenBatches, TrainLoader, blend_pattern, valid_batches
from megamem.data_tools.preprocess import PreprocessArgs, preprocess
from megamem.data_tools.shards import load_manifest
from megamem.errors import DataError
from tests.data_tools.conftest import documents
from tests.paths import REPO


def make_dataset(tmp_path, name, docs, seq_len=15):
    corpus = tmp_path / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess(PreprocessArgs([str(corpus)], str(tmp_path / name), seq_len=seq_len, shard_size_mb=0.01,
                              valid_fraction=0.2))
    return load_manifest(tmp_path / name)


@pytest.fixture
def manifest(tmp_path):
    return make_dataset(tmp_path, "ds", documents(400))


def rows(batches):
    return [tuple(row.tolist()) for batch in batches for row in batch]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_an_epoch_visits_every_sample_once_then_reshuffles(manifest):
    n = manifest.samples
    dataset = TokenBatches([manifest], [1.0], "train", 1, seed=3, dp_rank=0, dp_size=1)
    epoch0 = [tuple(dataset.sample(p)) for p in range(n)]
    epoch1 = [tuple(dataset.sample(p)) for p in range(n, 2 * n)]
    assert len(manifest.shards) > 3
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    assert len(set(epoch0)) == n


def test_order_is_fixed_by_the_seed(manifest):
    a, b, c = (rows(take(TrainLoader([manifest], [1.0], 4, seed, 0, 1, 0), 10)) for seed in (1, 1, 2))
    assert a == b and a != c


def test_worker_count_does_not_change_the_batches(manifest):
    alone = rows(take(TrainLoader([manifest], [1.0], 4, 7, 0, 1, 0), 30))
    assert rows(take(TrainLoader([manifest], [1.0], 4, 7, 0, 1, 2), 30)) == alone


def test_a_global_batch_is_the_same_whatever_the_data_parallel_split(manifest):
    alone = rows(take(TrainLoader([manifest], [1.0], 4, 5, 0, 1, 0), 20))          # 1 rank, 4 accumulation steps
    ranks = [take(TrainLoader([manifest], [1.0], 4, 5, r, 4, 0), 5) for r in range(4)]
    split = [row for k in range(5) for r in range(4) for row in rows([ranks[r][k]])]
    assert split == alone


def test_data_parallel_ranks_split_the_epoch(manifest):
    per_rank = manifest.samples // 2
    seen = [rows(take(TrainLoader([manifest], [1.0], 1, 5, r, 2, 0), per_rank)) for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 2 * per_rank


def test_resume_in_a_new_process_continues_with_the_next_batches(manifest, tmp_path):
    loader = TrainLoader([manifest], [1.0], 4, 11, 0, 1, 2)
    take(loader, 7)
    state = loader.state_dict()
    expected = rows(take(loader, 5))
    script = f"""
import json, sys
from megamem.data_tools.loader import TrainLoader
from megamem.data_tools.shards import load_manifest
loader = TrainLoader([load_manifest({str(manifest.directory)!r})], [1.0], 4, 11, 0, 1, 2)
loader.load_state_dict(json.loads(sys.argv[1]))
print(json.dumps([b.tolist() for b in (next(loader) for _ in range(5))]))
"""
    result = subprocess.run([sys.executable, "-c", script, json.dumps(state)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert [tuple(r) for batch in json.loads(result.stdout) for r in batch] == expected


def test_a_moved_dataset_still_resumes(manifest, tmp_path):
    import shutil

    loader = TrainLoader([manifest], [1.0], 4, 11, 0, 1, 0)
    take(loader, 3)
    state = loader.state_dict()
    expected = rows(take(loader, 2))
    moved = load_manifest(shutil.copytree(manifest.directory, tmp_path / "elsewhere" / "ds"))
    resumed = TrainLoader([moved], [1.0], 4, 11, 0, 1, 0)
    resumed.load_state_dict(state)
    assert rows(take(resumed, 2)) == expected


def test_resume_refuses_another_layout(manifest):
    state = TrainLoader([manifest], [1.0], 4, 11, 0, 1, 0).state_dict()
    with pytest.raises(DataError, match="would repeat or skip samples"):
        TrainLoader([manifest], [1.0], 4, 11, 0, 2, 0).load_state_dict(state)


def test_blending_follows_the_weights(tmp_path):
    a = make_dataset(tmp_path, "a", documents(300, seed=1))
    b = make_dataset(tmp_path, "b", [d.upper() for d in documents(300, seed=2)])
    dataset = TokenBatches([a, b], [3.0, 1.0], "train", 1, 0, 0, 1)
    n = 20000
    sources = [dataset.source_of(p)[0] for p in range(n)]
    assert abs(sources.count(0) / n - 0.75) < 0.005
    upper = sum(1 for p in range(2000) if any(65 <= t <= 90 for t in dataset.sample(p)))
    assert abs(upper / 2000 - 0.25) < 0.03                    # samples really come from b a quarter of the time
    own = [dataset.source_of(p) for p in range(n)]
    for d in (0, 1):
        assert [q for s, q in own if s == d] == list(range(sources.count(d)))   # each dataset read in its own order


def test_blend_pattern_rounds_by_largest_remainder():
    pattern, before = blend_pattern([1.0, 1.0, 1.0], block=10)
    assert before[-1].tolist() == [4, 3, 3] and sorted(pattern.tolist()) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_validation_batches_are_the_same_each_time_and_for_any_split(manifest):
    first = rows(valid_batches([manifest], 4, 0, 1, 3))
    assert len(first) == 12 and first == rows(valid_batches([manifest], 4, 0, 1, 3))
    shared = [rows(valid_batches([manifest], 4, r, 2, 3)) for r in range(2)]
    assert len(shared[0]) == 8 and len(shared[1]) == 4 and sorted(shared[0] + shared[1]) == sorted(first)
    train = set(rows(take(TrainLoader([manifest], [1.0], 4, 0, 0, 1, 0), 50)))
    assert not set(first) & train


def test_a_corrupt_shard_stops_the_loader_with_its_name(manifest):
    path = manifest.directory / manifest.shards[0].path
    data = bytearray(path.read_bytes())
    data[-2000] ^= 1
    path.write_bytes(bytes(data))
    loader = TrainLoader([manifest], [1.0], 64, 0, 0, 1, 2)
    with pytest.raises(DataError, match=rf"^shard {path} is corrupt or truncated"):
        take(loader, manifest.samples // 64 + 1)
