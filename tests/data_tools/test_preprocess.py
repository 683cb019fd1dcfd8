"""megamem preprocess: round trip, worker independence, crash and resume."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from megamem.cli.main import main
from megamem.data_tools.preprocess import PreprocessArgs, in_valid_split, preprocess
from megamem.data_tools.shards import load_manifest, read_shard
from megamem.data_tools.tokenizer import ByteTokenizer
from megamem.errors import DataError


def shard_tokens(directory, split="train"):
    manifest = load_manifest(directory)
    shards = manifest.shards if split == "train" else manifest.valid_shards
    return np.concatenate([read_shard(manifest.directory, s, manifest.seq_len, manifest.dtype).ravel() for s in shards])


def run(corpus, out, **kw):
    args = dict(seq_len=31, valid_fraction=0.1, shard_size_mb=0.004)
    args.update(kw)
    return preprocess(PreprocessArgs([str(corpus)], str(out), **args))


def test_round_trip_tokens_equal_the_tokenized_documents_in_order(corpus, tmp_path):
    path, docs = corpus
    summary = run(path, tmp_path / "out")
    tok = ByteTokenizer()
    streams = {"train": [], "valid": []}
    for i, doc in enumerate(docs):
        streams["valid" if in_valid_split(i, 0.1) else "train"].append(np.append(tok.encode(doc), tok.eod_id))
    for split, pieces in streams.items():
        expected = np.concatenate(pieces)
        got = shard_tokens(tmp_path / "out", split)
        assert len(got) == len(expected) // 32 * 32          # only the last partial sample is dropped
        assert (got == expected[: len(got)]).all()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["seq_len"] == 31 and manifest["tokenizer"]["kind"] == "byte"
    assert len(manifest["shards"]) > 3 and {"path", "samples", "tokens", "sha256"} == set(manifest["shards"][0])
    assert summary.counts.documents == 600 and 30 < summary.valid_documents < 90
    assert manifest["sources"][0]["bytes"] == path.stat().st_size and manifest["arguments"]["seq_len"] == 31


def test_output_bytes_do_not_depend_on_the_worker_count(corpus, tmp_path):
    path, _ = corpus
    run(path, tmp_path / "one", workers=1)
    run(path, tmp_path / "three", workers=3)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "three").glob("*.tar")) and len(names) > 3
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


def test_killed_run_resumes_to_the_same_output(tmp_path):
    from tests.data_tools.conftest import documents, kill_once_saved

    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": d * 20}) + "\n" for d in documents(3000)))
    command = [sys.executable, "-m", "megamem.cli.main", "preprocess", "--input", str(corpus), "--seq-len", "255",
               "--shard-size-mb", "0.05", "--workers", "2"]
    reference = subprocess.run(command + ["--output", str(tmp_path / "clean")], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "crashed"
    kill_once_saved(command + ["--output", str(out)], out / ".preprocess-state.json")
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed; make the corpus larger"
    with pytest.raises(DataError, match="preprocessing did not finish"):
        load_manifest(out)

    resumed = subprocess.run(command + ["--output", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after documents" in resumed.stdout
    clean, again = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "clean", out))
    assert clean["shards"] == again["shards"] and clean["valid_shards"] == again["valid_shards"]
    assert clean["counts"] == again["counts"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".pending-*"))


def test_finished_or_foreign_output_directories_are_refused(corpus, tmp_path):
    path, _ = corpus
    run(path, tmp_path / "out")
    with pytest.raises(DataError, match="already holds a finished dataset"):
        run(path, tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="holds shards but no"):
        run(path, tmp_path / "other")


def test_cli_prints_progress_and_every_count(corpus, tmp_path, capsys):
    path, _ = corpus
    assert main(["preprocess", "--input", str(path), "--output", str(tmp_path / "o"), "--seq-len", "63"]) == 0
    out, err = capsys.readouterr()
    assert "100.0%" in err and "600 docs" in err
    for label in ("documents", "empty, skipped", "invalid UTF-8, replaced", "malformed jsonl lines",
                  "jsonl lines without the key", "tokens", "train samples", "valid samples", "peak RSS MB"):
        assert label in out
    assert main(["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "p"),
                 "--seq-len", "8"]) == 2
    assert "input not found" in capsys.readouterr().err
