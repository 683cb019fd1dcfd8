"""Shards and manifests that do not match: each names itself and the fix."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megamem.data_tools.preprocess import PreprocessArgs, preprocess
from megamem.data_tools.shards import DataSpec, load_manifest, open_datasets, read_shard, write_shard
from megamem.data_tools.tokenizer import ByteTokenizer
from megamem.errors import DataError


@pytest.fixture
def dataset(corpus, tmp_path):
    preprocess(PreprocessArgs([str(corpus[0])], str(tmp_path / "ds"), seq_len=31, shard_size_mb=0.004))
    return tmp_path / "ds"


def spec(path, **kw):
    args = dict(paths=[str(path)], weights=[1.0], seq_len=31, vocab_size=257, tokenizer_hash=ByteTokenizer.hash,
                tokenizer_name="byte")
    args.update(kw)
    return DataSpec(**args)


def test_shards_are_plain_webdataset_tars(tmp_path):
    import webdataset as wds

    samples = np.arange(3 * 9, dtype=np.uint16).reshape(3, 9)
    write_shard(tmp_path, "train-000000.tar", 10, samples)
    got = list(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == ["000000000010", "000000000011", "000000000012"]
    assert all((s["tokens.npy"] == row).all() for s, row in zip(got, samples, strict=True))


def test_corrupt_shard_is_named(dataset):
    manifest = load_manifest(dataset)
    info = manifest.shards[1]
    data = bytearray((dataset / info.path).read_bytes())
    data[700] ^= 0xFF
    (dataset / info.path).write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {dataset / info.path} is corrupt or truncated"):
        read_shard(dataset, info, 31, manifest.dtype)


def test_truncated_shard_is_named(dataset):
    manifest = load_manifest(dataset)
    info = manifest.shards[0]
    path = dataset / info.path
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError, match=rf"shard {path} is corrupt or truncated"):
        read_shard(dataset, info, 31, manifest.dtype)


def test_wrong_sample_count_is_named_even_with_a_matching_checksum(dataset):
    manifest = load_manifest(dataset)
    info = manifest.shards[0]
    info.samples += 1
    with pytest.raises(DataError, match=rf"holds {info.samples - 1} samples, the manifest says {info.samples}"):
        read_shard(dataset, info, 31, manifest.dtype)


def test_missing_shard_and_missing_manifest(dataset, tmp_path):
    (dataset / load_manifest(dataset).shards[2].path).unlink()
    with pytest.raises(DataError, match=r"train-000002\.tar listed in .* is missing"):
        load_manifest(dataset)
    with pytest.raises(DataError, match=r"no dataset at .*nothing: .*manifest\.json is missing"):
        load_manifest(tmp_path / "nothing")


def test_manifest_must_match_model_and_tokenizer(dataset):
    open_datasets(spec(dataset))
    with pytest.raises(DataError, match=r"sequences of 31 tokens but model\.seq_len is 64.*--seq-len 64"):
        open_datasets(spec(dataset, seq_len=64))
    with pytest.raises(DataError, match=r"different tokenizer .* than data\.tokenizer=other\.json"):
        open_datasets(spec(dataset, tokenizer_hash="0" * 64, tokenizer_name="other.json"))
    with pytest.raises(DataError, match=r"uses 257 token ids but model\.vocab_size is 100"):
        open_datasets(spec(dataset, vocab_size=100))


def test_garbled_manifest(dataset):
    (dataset / "manifest.json").write_text(json.dumps({"seq_len": 31}))
    with pytest.raises(DataError, match=r"is not a megamem manifest"):
        load_manifest(dataset)
