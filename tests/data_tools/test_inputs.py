"""Input discovery, decompression and every kind of bad input."""
from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from megamem.data_tools import inputs
from megamem.data_tools.inputs import Counts, expand_inputs, read_pieces
from megamem.errors import DataError


def texts(path, key="text", on_error="skip"):
    counts = Counts()
    return [p.text for p in read_pieces(path, key, on_error, counts)], counts


def test_directories_globs_and_missing_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.py").write_text("x = 1\n")
    (tmp_path / "a" / "y.jsonl").write_text('{"text": "y"}\n')
    (tmp_path / "a" / "skip.bin").write_bytes(b"\0")
    assert [p.name for p in expand_inputs([str(tmp_path / "a")])] == ["x.py", "y.jsonl"]
    assert [p.name for p in expand_inputs([str(tmp_path / "**" / "*.py")])] == ["x.py"]
    with pytest.raises(DataError, match=r"input not found: .*nowhere\.jsonl"):
        expand_inputs([str(tmp_path / "nowhere.jsonl")])
    with pytest.raises(DataError, match=r"matches no file"):
        expand_inputs([str(tmp_path / "*.txt")])


def test_excluded_paths_are_left_out_and_excluding_everything_is_refused(tmp_path):
    """As the demo takes the standard library without the packages installed into it."""
    for path in ("lib/os.py", "lib/json/decoder.py", "lib/site-packages/numpy/core.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x = 1\n")
    kept = expand_inputs([str(tmp_path / "lib" / "**" / "*.py")], exclude=["*/site-packages/*"])
    assert [p.relative_to(tmp_path).as_posix() for p in kept] == ["lib/json/decoder.py", "lib/os.py"]
    with pytest.raises(DataError, match=r"--exclude \*\.py leaves none of the 3 input files"):
        expand_inputs([str(tmp_path / "lib")], exclude=["*.py"])


def test_gzip_and_zstd(tmp_path):
    lines = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"plain text\n"))
    assert texts(tmp_path / "a.jsonl.gz")[0] == ["doc 0", "doc 1", "doc 2"]
    assert texts(tmp_path / "b.jsonl.zst")[0] == ["doc 0", "doc 1", "doc 2"]
    assert texts(tmp_path / "c.txt.zst")[0] == ["plain text\n"]


def test_malformed_and_keyless_lines_skip_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good"}\n{not json\n{"body": "x"}\n{"text": "also good"}\n')
    got, counts = texts(path)
    assert got == ["good", "also good"]
    assert (counts.malformed_lines, counts.missing_key_lines, counts.documents) == (1, 1, 2)
    err = capsys.readouterr().err
    assert f"{path}:2: malformed JSON line" in err and f"{path}:3: no string under key 'text'" in err


def test_on_error_fail_stops_at_the_first_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good"}\n{not json\n')
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON line .*--on-error skip"):
        texts(path, on_error="fail")


def test_invalid_utf8_is_replaced_and_counted_and_empty_documents_skipped(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    got, counts = texts(tmp_path / "bad.txt")
    assert got == ["caf\ufffd au lait\n"] and counts.invalid_utf8_documents == 1
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "   "}\n')
    got, counts = texts(tmp_path / "bad.jsonl")
    assert got == ["caf\ufffd"] and (counts.invalid_utf8_documents, counts.empty_documents) == (1, 1)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    assert texts(tmp_path / "empty.txt")[1].empty_documents == 1


def test_large_text_files_stream_in_pieces_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "TEXT_PIECE_BYTES", 64)
    body = "\n\n" + "".join(f"line {i} ü\n" for i in range(100))
    (tmp_path / "big.txt").write_text(body)
    pieces = list(read_pieces(tmp_path / "big.txt", "text", "skip", Counts()))
    assert len(pieces) > 5 and "".join(p.text for p in pieces) == body
    assert [p.first for p in pieces].count(True) == 1 and pieces[0].first and pieces[-1].last
    assert all(p.text.endswith("\n") for p in pieces)
