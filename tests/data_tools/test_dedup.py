"""--dedup exact: a document whose normalized text came before is dropped, the same ones whatever the number of
tasks, and a resumed run drops what an uninterrupted one does."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megamem.data_tools.dedup import DocumentDigest, first_occurrences
from megamem.data_tools.preprocess import PreprocessArgs, in_valid_split, preprocess
from megamem.data_tools.preprocess_tasks import merge, run_task
from megamem.data_tools.tokenizer import ByteTokenizer
from tests.data_tools.conftest import documents, kill_once_saved
from tests.data_tools.test_preprocess import shard_tokens

ARGS = dict(seq_len=15, valid_fraction=0.2, shard_size_mb=0.001, dedup="exact")


def digest(*pieces: str) -> bytes:
    hasher = DocumentDigest()
    for piece in pieces:
        hasher.update(piece)
    return hasher.digest()


def test_text_is_normalized_before_it_is_compared():
    assert digest("a b") == digest("  a \n\t b  ") == digest("a ", " b") == digest("a\n", "\nb") == digest("a", " b")
    assert digest("caf\u00e9") == digest("cafe\u0301")                          # NFC
    assert digest("a b") != digest("ab") != digest("A b") and digest("ab") == digest("a", "b")


def test_the_first_occurrence_is_kept():
    keys = np.array([[1] * 16, [2] * 16, [1] * 16, [3] * 16, [2] * 16], dtype=np.uint8)
    assert first_occurrences(keys).tolist() == [True, True, False, True, False]
    assert first_occurrences(np.zeros((0, 16), dtype=np.uint8)).tolist() == []


def write_corpus(folder, texts: list[str], files: int) -> None:
    folder.mkdir(exist_ok=True)
    bounds = np.linspace(0, len(texts), files + 1).astype(int)
    for i in range(files):
        lines = texts[bounds[i]:bounds[i + 1]]
        (folder / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))


def expected_streams(texts: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """What --dedup exact must keep, by the module's own definition: the first of each normalized text, each
    document numbered in corpus order (dropped ones too) for the validation split."""
    tok, seen, streams, dropped = ByteTokenizer(), set(), {"train": [], "valid": []}, 0
    for number, text in enumerate(t for t in texts if t.strip()):
        key = " ".join(text.split())
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        streams["valid" if in_valid_split(number, ARGS["valid_fraction"]) else "train"].append(
            np.append(tok.encode(text), tok.eod_id))
    return {split: np.concatenate(parts) for split, parts in streams.items()}, dropped


base = st.sampled_from(["alpha beta", "gamma", "delta  epsilon", "zeta eta theta", "iota kappa lambda mu"] +
                       [d for d in documents(6, seed=9)])
variant = st.tuples(base, st.sampled_from(["", " ", "\n", "  \t"]), st.sampled_from(["", " ", "\n"]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(variant.map(lambda v: v[1] + v[0].replace(" ", v[2] or " ") + v[1]), min_size=8, max_size=40),
       files=st.integers(1, 4), num_tasks=st.integers(1, 3))
def test_the_same_documents_are_dropped_whatever_the_order_and_the_tasks(tmp_path_factory, texts, files, num_tasks):
    root = tmp_path_factory.mktemp("dedup")
    texts = documents(4, seed=11) + texts          # enough text for a training sample whatever is dropped
    write_corpus(root / "corpus", texts, files)
    one = preprocess(PreprocessArgs([str(root / "corpus")], str(root / "one"), **ARGS))
    streams, dropped = expected_streams(texts)
    assert one.duplicate_documents == dropped
    for split, stream in streams.items():
        got = shard_tokens(root / "one", split) if (one.train_samples if split == "train" else one.valid_samples) \
            else np.zeros(0, np.uint16)
        assert (got == stream[:len(got)]).all() and len(stream) - len(got) < 16
    for task in range(num_tasks):
        run_task(PreprocessArgs([str(root / "corpus")], str(root / "tasks"), **ARGS), task, num_tasks)
    merged = merge(root / "tasks")
    assert merged.duplicate_documents == dropped
    assert {p.name: p.read_bytes() for p in (root / "one").iterdir()} == \
        {p.name: p.read_bytes() for p in (root / "tasks").iterdir()}


def test_a_resumed_run_drops_what_an_uninterrupted_one_drops(tmp_path):
    corpus = tmp_path / "corpus"
    texts = [d * 20 for d in documents(1500, seed=4)]
    write_corpus(corpus, texts + [" ".join(t.split()) + " " for t in texts[::2]], 3)
    command = [sys.executable, "-m", "megamem.cli.main", "preprocess", "--input", str(corpus), "--seq-len", "255",
               "--shard-size-mb", "0.05", "--workers", "2", "--dedup", "exact"]
    clean = subprocess.run(command + ["--output", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "crashed"
    kill_once_saved(command + ["--output", str(out)], out / ".preprocess-state.json")
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed; make the corpus larger"
    resumed = subprocess.run(command + ["--output", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed after documents" in resumed.stdout, resumed.stderr
    first, again = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "clean", out))
    assert first == again and first["counts"]["duplicate_documents"] == 750
