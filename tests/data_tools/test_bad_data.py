"""The catalogue of bad data inputs: each must end in one DataError that names the file and the fix.

Property tests throw damaged manifests and damaged shards at the loader. A damaged shard gets a manifest whose
sha256 matches its bytes, so the tar parser is what is tested, not only the checksum in front of it. Below them
come the catalogue's named cases; those covered in test_shards.py, test_loader.py and test_inputs.py (a corrupt
byte, a truncated shard, a wrong sample count, a missing shard or manifest, another seq_len or tokenizer,
malformed jsonl lines) are not repeated here.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import hashlib
import io
import json
import operator
import re
import shutil
import signal
import tarfile

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megamem.data_tools.inputs import Counts, expand_inputs, read_pieces
from megamem.data_tools.loader import TokenBatches
from megamem.data_tools.preprocess import PreprocessArgs, preprocess
from megamem.data_tools.shards import DataSpec, load_manifest, open_datasets, read_shard
from megamem.data_tools.tokenizer import ByteTokenizer
from megamem.errors import DataError
from tests.data_tools.conftest import documents

SEQ_LEN = 15
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


class Hang(Exception):
    """A read that took far longer than a read of a small shard can: a loop, failed instead of hanging CI."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise Hang in this very process once `seconds` have passed (SIGALRM): a parser caught in a loop fails the
    example instead of hanging CI."""
    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def make_dataset(directory, docs, **kw):
    corpus = directory.with_suffix(".jsonl")
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess(PreprocessArgs([str(corpus)], str(directory), seq_len=SEQ_LEN, **kw))
    return directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A real dataset of several train and valid shards; never changed, tests work on copies."""
    return make_dataset(tmp_path_factory.mktemp("pristine") / "ds", documents(60), shard_size_mb=0.004,
                        valid_fraction=0.2)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """A real dataset of one train shard and no validation split."""
    return make_dataset(tmp_path_factory.mktemp("one") / "ds", documents(8), valid_fraction=0.0)


@pytest.fixture
def lab(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "ds")


def spec(directory):
    return DataSpec([str(directory)], [1.0], SEQ_LEN, 257, ByteTokenizer.hash, "byte")


def read_all(directory, splits=("train", "valid")) -> list[np.ndarray]:
    """Every sample the loader gives, per split in its order, opened as training opens data."""
    with time_limit(10):
        manifest, = open_datasets(spec(directory))
        result = []
        for split in splits:
            batches = TokenBatches([manifest], [1.0], split, 1, 0, 0, 1)
            result.append(np.stack([batches.sample(p) for p in range(batches.orders[0].samples)]))
        return result


def outcome(directory, splits=("train", "valid")) -> list[np.ndarray] | DataError:
    """What read_all gives, or the DataError it raises: nothing else may come out."""
    try:
        return read_all(directory, splits)
    except DataError as err:
        return err


def manifest_of(directory) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def write_json(directory, content) -> None:
    (directory / "manifest.json").write_text(json.dumps(content))


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def put_shard(directory, data: bytes, match_hash: bool = True) -> str:
    """Replace the first train shard by `data`; with `match_hash` the manifest's sha256 is made to fit the bytes."""
    content = manifest_of(directory)
    entry = content["shards"][0]
    (directory / entry["path"]).write_bytes(data)
    if match_hash:
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        write_json(directory, content)
    return str(directory / entry["path"])


# One member (the third) of a shard replaced by something megamem never writes, and the refusal it meets; n is the
# shard's sample count.
MEMBER_CHANGES = {
    "symlink": "member '000000000002.tokens.npy' is a symlink, not a regular file",
    "hardlink": "member '000000000002.tokens.npy' is a hard link, not a regular file",
    "directory": "member '000000000002.tokens.npy' is a directory, not a regular file",
    "fifo": "member '000000000002.tokens.npy' is a fifo, not a regular file",
    "chardev": "member '000000000002.tokens.npy' is a character device, not a regular file",
    "blockdev": "member '000000000002.tokens.npy' is a block device, not a regular file",
    "absolute": "member '/000000000002.tokens.npy' is not named like a sample (12 digits, then .tokens.npy)",
    "dotdot": "member '../000000000002.tokens.npy' is not named like a sample (12 digits, then .tokens.npy)",
    "subdirectory": "member 'sub/000000000002.tokens.npy' is not named like a sample (12 digits, then .tokens.npy)",
    "other name": "member '000000000002.txt' is not named like a sample (12 digits, then .tokens.npy)",
    "duplicate": "holds member '000000000001.tokens.npy' twice",
    "short payload": "member '000000000002.tokens.npy' is not a 16-token uint16 .npy array",
    "dropped": "holds {fewer} samples, the manifest says {n}",
    "extra": "holds {more} samples, the manifest says {n}",
}
SPECIAL_TYPES = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "directory": tarfile.DIRTYPE,
                 "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE, "blockdev": tarfile.BLKTYPE}
NEW_NAMES = {"absolute": "/{}.tokens.npy", "dotdot": "../{}.tokens.npy", "subdirectory": "sub/{}.tokens.npy",
             "other name": "{}.txt"}


def rebuilt(members: list[tuple[str, bytes]], index: int, change: str) -> bytes:
    """A tar of `members` in which member `index` undergoes `change` (a key of MEMBER_CHANGES)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for i, (name, payload) in enumerate(members):
            if i != index:
                add(name, payload)
            elif change in SPECIAL_TYPES:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = SPECIAL_TYPES[change], members[0][0]
                tar.addfile(info)
            elif change in NEW_NAMES:
                add(NEW_NAMES[change].format(name.removesuffix(".tokens.npy")), payload)
            elif change == "duplicate":
                add(members[index - 1][0], payload)
            elif change == "short payload":
                add(name, payload[:-2])
            elif change == "extra":
                add(name, payload)
                add("999999999999.tokens.npy", payload)
            # "dropped": the member is left out
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- property tests

def damaged_manifest(draw, content: dict, text: bytes) -> bytes:
    kind = draw(st.sampled_from(["edit", "edit", "edit", "edit", "json", "bytes", "truncated"]))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    if kind == "truncated":
        return text[:draw(st.integers(0, len(text) - 1))]
    return json.dumps(edited(draw, content)).encode()


def places(value, path=()):
    """The path of every value inside `value`, below the top."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield path + (key,)
        yield from places(inner, path + (key,))


def edited(draw, content: dict) -> dict:
    """`content` with one random change at one of its places: the value dropped, its key renamed, the list item
    repeated, a number nudged, a string edited, or the value replaced by random JSON."""
    content = copy.deepcopy(content)
    *above, key = draw(st.sampled_from(list(places(content))))
    parent = functools.reduce(operator.getitem, above, content)
    value = parent[key]
    changes = ["replace", "drop", "rename" if isinstance(parent, dict) else "repeat"]
    changes += ["nudge"] if type(value) is int else ["edit"] if isinstance(value, str) else []
    change = draw(st.sampled_from(changes))
    if change == "drop":
        del parent[key]
    elif change == "rename":
        parent[key + draw(st.text(min_size=1, max_size=3))] = parent.pop(key)
    elif change == "repeat":
        parent.insert(key, value)
    elif change == "nudge":
        parent[key] = value + draw(st.integers(-3, 3).filter(bool))
    elif change == "edit":
        start = draw(st.integers(0, len(value)))
        parent[key] = value[:start] + draw(st.text(max_size=3)) + value[start + draw(st.integers(0, 3)):]
    else:
        parent[key] = draw(JSON)
    return content


@pytest.fixture(scope="module")
def expected(pristine):
    return read_all(pristine)


@FUZZ
@given(data=st.data())
def test_a_damaged_manifest_gives_the_same_samples_or_a_data_error(pristine, expected, tmp_path_factory, data):
    """Whatever manifest.json holds: the dataset's own samples, all of them, or one DataError."""
    text = (pristine / "manifest.json").read_bytes()
    directory = shutil.copytree(pristine, tmp_path_factory.mktemp("manifest") / "ds")
    (directory / "manifest.json").write_bytes(damaged_manifest(data.draw, json.loads(text), text))
    result = outcome(directory)
    if not isinstance(result, DataError):
        assert all(np.array_equal(a, b) for a, b in zip(result, expected, strict=True))


def damaged_shard(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flips", "truncated", "random", "empty", "appended", "member"]))
    if kind == "flips":
        damaged = bytearray(data)
        for position, bit in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)),
                                           min_size=1, max_size=8)):
            damaged[position] ^= 1 << bit
        return bytes(damaged)
    if kind == "truncated":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "empty":
        return b""
    if kind == "appended":
        return data + draw(st.binary(min_size=1, max_size=2048))
    members = members_of(data)
    return rebuilt(members, draw(st.integers(1, len(members) - 1)), draw(st.sampled_from(sorted(MEMBER_CHANGES))))


@FUZZ
@given(data=st.data())
def test_a_damaged_shard_gives_all_its_samples_or_a_data_error(one_shard, tmp_path_factory, data):
    """Whatever bytes a shard holds, with a checksum that matches them: as many samples as the manifest lists,
    each of seq_len + 1 tokens, or one DataError; never a hang, another exception or fewer samples."""
    pristine = load_manifest(one_shard)
    directory = shutil.copytree(one_shard, tmp_path_factory.mktemp("shard") / "ds")
    put_shard(directory, damaged_shard(data.draw, (one_shard / pristine.shards[0].path).read_bytes()))
    result = outcome(directory, splits=("train",))
    if not isinstance(result, DataError):
        assert result[0].shape == (pristine.samples, SEQ_LEN + 1)
        rows = read_shard(directory, load_manifest(directory).shards[0], SEQ_LEN, pristine.dtype)
        assert rows.shape == (pristine.samples, SEQ_LEN + 1)


# ---------------------------------------------------------------------------------------------- the catalogue

@pytest.mark.parametrize("match_hash", [False, True], ids=["manifest hash", "hash of the empty file"])
def test_a_zero_length_shard(lab, match_hash):
    path = put_shard(lab, b"", match_hash)
    with pytest.raises(DataError, match=rf"^shard {path} is empty \(0 bytes.*Fix: re-run megamem preprocess"):
        read_all(lab)


def test_a_truncated_shard_whose_hash_was_made_to_match(lab):
    data = (lab / load_manifest(lab).shards[0].path).read_bytes()
    path = put_shard(lab, data[:3 * 1024 + 600])                     # inside the fourth member's payload
    with pytest.raises(DataError, match=rf"^shard {path} is truncated inside member '000000000003\.tokens\.npy'"):
        read_all(lab)
    put_shard(lab, data[:3 * 1024])                                   # after the third member
    with pytest.raises(DataError, match=r"holds 3 samples, the manifest says \d+\. Fix: re-run megamem preprocess"):
        read_all(lab)


def test_garbage_whose_hash_was_made_to_match(lab):
    path = put_shard(lab, b"not a tar file " * 100)
    with pytest.raises(DataError, match=rf"^shard {path} is not a readable tar \(.*\)\. Fix: re-run megamem"):
        read_all(lab)


@pytest.mark.parametrize("change", sorted(MEMBER_CHANGES))
def test_a_member_megamem_never_writes(one_shard, tmp_path, change):
    directory = shutil.copytree(one_shard, tmp_path / "ds")
    info = load_manifest(directory).shards[0]
    n = info.samples
    path = put_shard(directory, rebuilt(members_of((directory / info.path).read_bytes()), 2, change))
    message = MEMBER_CHANGES[change].format(n=n, fewer=n - 1, more=n + 1)
    with pytest.raises(DataError, match=re.escape(f"shard {path} {message}. Fix: re-run megamem preprocess")):
        read_all(directory, splits=("train",))


def test_a_negative_member_size_is_refused_not_followed_round_in_circles(one_shard, tmp_path):
    """A GNU base-256 size of -1536 in the third header points tarfile back at the second: a plain walk over the
    members never ends."""
    directory = shutil.copytree(one_shard, tmp_path / "ds")
    data = bytearray((directory / load_manifest(directory).shards[0].path).read_bytes())
    header = tarfile.TarInfo("000000000002.tokens.npy")
    header.size = -1536
    data[2048:2560] = header.tobuf(format=tarfile.GNU_FORMAT)
    path = put_shard(directory, bytes(data))
    with pytest.raises(DataError, match=rf"^shard {path} member '000000000002\.tokens\.npy' is not a 16-token"):
        read_all(directory, splits=("train",))


def test_a_shard_removed_or_replaced_after_the_data_was_opened(lab):
    manifest, = open_datasets(spec(lab))
    path = lab / manifest.shards[0].path
    path.unlink()
    with pytest.raises(DataError, match=rf"^shard {path} is missing\. Fix: restore it"):
        read_shard(lab, manifest.shards[0], SEQ_LEN, manifest.dtype)
    path.mkdir()
    with pytest.raises(DataError, match=rf"^shard {path} cannot be read \(Is a directory\)\. Fix:"):
        read_shard(lab, manifest.shards[0], SEQ_LEN, manifest.dtype)


def _drop_first_shard(content):
    del content["shards"][0]


def _repeat_first_shard(content):
    content["shards"].append(content["shards"][0])


MANIFEST_EDITS = {
    "samples 0": (lambda c: c["shards"][0].update(samples=0), r"shards\[0\] samples 0 is not a positive integer"),
    "samples -3": (lambda c: c["shards"][0].update(samples=-3), r"shards\[0\] samples -3 is not a positive"),
    "samples true": (lambda c: c["shards"][0].update(samples=True), r"shards\[0\] samples True is not a positive"),
    "tokens off": (lambda c: c["shards"][0].update(tokens=c["shards"][0]["tokens"] + 1),
                   r"shards\[0\] tokens \d+ is not samples x \(seq_len \+ 1\)"),
    "seq_len 0": (lambda c: c.update(seq_len=0), r"seq_len 0 is not a positive integer"),
    "seq_len string": (lambda c: c.update(seq_len="15"), r"seq_len '15' is not a positive integer"),
    "seq_len float": (lambda c: c.update(seq_len=15.0), r"seq_len 15\.0 is not a positive integer"),
    "dtype float32": (lambda c: c.update(dtype="float32"), r"dtype 'float32' is not one of uint16, uint32"),
    "absolute path": (lambda c: c["shards"][0].update(path="/etc/passwd"),
                      r"shards\[0\] path '/etc/passwd' is not a relative path inside the dataset directory"),
    "path with ..": (lambda c: c["valid_shards"][0].update(path="../ds/valid-000000.tar"),
                     r"valid_shards\[0\] path '\.\./ds/valid-000000\.tar' is not a relative path"),
    "short sha256": (lambda c: c["shards"][0].update(sha256="abc"), r"shards\[0\] sha256 'abc' is not 64 lowercase"),
    "sha256 upper case": (lambda c: c["shards"][0].update(sha256=c["shards"][0]["sha256"].upper()),
                          r"shards\[0\] sha256 '[0-9A-F]{64}' is not 64 lowercase hex digits"),
    "extra shard key": (lambda c: c["shards"][0].update(size=1),
                        r"shards\[0\] is not an object of exactly path, samples, tokens and sha256"),
    "tokenizer without hash": (lambda c: c["tokenizer"].pop("hash"),
                               r"tokenizer is not an object with a kind, a hash and a positive vocab_size"),
    "shards not a list": (lambda c: c.update(shards={}), r"shards is not a list"),
    "shard dropped from the list": (_drop_first_shard, r"shards hold \d+ samples but counts\.train_samples is \d+"),
    "shard listed twice": (_repeat_first_shard, r"shard train-000000\.tar is listed twice"),
    "other format": (lambda c: c.update(format="megamem-shards-v0"),
                     r"format is 'megamem-shards-v0', not 'megamem-shards-v1'"),
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_a_manifest_field_out_of_type_or_range(lab, edit):
    change, problem = MANIFEST_EDITS[edit]
    content = manifest_of(lab)
    change(content)
    write_json(lab, content)
    with pytest.raises(DataError, match=rf"^{lab / 'manifest.json'} is not a megamem manifest \({problem}.*\)\. "
                                        rf"Fix: re-run megamem preprocess into {lab}$"):
        load_manifest(lab)


@pytest.mark.parametrize("text, problem", [(b"[1, 2]", "the top level is a JSON list, not an object"),
                                           (b'{"seq_len": 15', "it is not JSON: Expecting"),
                                           (b"\xff\xfe\x00garbage", "it is not JSON: "),
                                           (b"[" * 100_000, "it is not JSON: ")],
                         ids=["a list", "truncated", "not UTF-8", "nested too deep"])
def test_a_manifest_that_is_not_a_json_object(lab, text, problem):
    (lab / "manifest.json").write_bytes(text)
    with pytest.raises(DataError, match=rf"is not a megamem manifest \({problem}.*Fix: re-run megamem preprocess"):
        load_manifest(lab)


def run_preprocess(tmp_path, inputs, **kw):
    return preprocess(PreprocessArgs([str(p) for p in inputs], str(tmp_path / "out"), seq_len=SEQ_LEN, **kw))


def test_a_corpus_without_text_is_refused_before_a_manifest_is_written(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "blank.jsonl").write_text('{"text": " "}\n\n')
    with pytest.raises(DataError, match=r"^the inputs give no training sample of 16 tokens \(2 files, 0 non-empty "
                                        r"documents, 0 tokens; .*Fix: add text, check --input and --json-key"):
        run_preprocess(tmp_path, [tmp_path / "blank.txt", tmp_path / "blank.jsonl"])
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_corpus_under_another_json_key_or_too_short_is_refused(tmp_path):
    (tmp_path / "body.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in documents(5)))
    with pytest.raises(DataError, match=r"0 non-empty documents, 0 tokens; 5 jsonl lines and 0 binary files skipped"):
        run_preprocess(tmp_path, [tmp_path / "body.jsonl"])
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match=r"1 non-empty documents, 5 tokens; .*or lower --seq-len"):
        run_preprocess(tmp_path, [tmp_path / "short.txt"], valid_fraction=0.0)


def test_no_input_files(tmp_path):
    with pytest.raises(DataError, match=r"^no input given\. Fix: pass files"):
        expand_inputs([])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"input directory .*images holds no \.jsonl or text files .*\. Fix: point"):
        expand_inputs([str(tmp_path / "images")])


def test_invalid_utf8_is_replaced_with_a_warning_naming_the_count_and_a_file(tmp_path, capsys):
    (tmp_path / "good.txt").write_text(" ".join(documents(20)))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "cr\xe8me"}\n')
    run_preprocess(tmp_path, [tmp_path / "good.txt", tmp_path / "latin1.jsonl"], valid_fraction=0.0)
    assert (f"warning: 2 documents are not valid UTF-8 (files: 1, the first: {tmp_path / 'latin1.jsonl'}); "
            "their bad bytes became U+FFFD") in capsys.readouterr().err
    assert manifest_of(tmp_path / "out")["counts"]["invalid_utf8_documents"] == 2


def test_a_binary_file_among_text_files_is_skipped_with_a_warning(tmp_path, capsys):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "utf16.txt").write_bytes("text saved as UTF-16".encode("utf-16"))
    counts = Counts()
    for name in ("blob.txt", "utf16.txt"):
        assert list(read_pieces(tmp_path / name, "text", "skip", counts)) == []
    assert (counts.binary_files, counts.documents) == (2, 0)
    assert f"warning: {tmp_path / 'blob.txt'} looks binary (a NUL byte in its first 8 KiB); skipped" \
        in capsys.readouterr().err


LINES = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(500)).encode()
GZIP, ZSTD = gzip.compress(LINES), zstandard.ZstdCompressor().compress(LINES)


@pytest.mark.parametrize("name, data, problem", [
    ("cut.jsonl.gz", GZIP[:len(GZIP) // 2], r"cannot be read \(Compressed file ended before the end-of-stream"),
    ("flipped.jsonl.gz", GZIP[:-12] + bytes([GZIP[-12] ^ 1]) + GZIP[-11:], r"cannot be read \("),
    ("plain.jsonl.gz", LINES, r"cannot be read \(Not a gzipped file"),
    ("cut.jsonl.zst", ZSTD[:-5], r"is truncated: it ends inside a zstd frame"),
    ("plain.jsonl.zst", LINES, r"is not valid zstd \("),
], ids=["truncated gzip", "corrupt gzip", "not gzip", "truncated zstd", "not zstd"])
def test_a_damaged_compressed_input(tmp_path, name, data, problem):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=rf"^input {tmp_path / name} {problem}.*Fix: download or compress it again"):
        list(read_pieces(tmp_path / name, "text", "skip", Counts()))
