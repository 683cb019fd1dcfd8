"""Token shards on disk: WebDataset tar files of `.tokens.npy` samples, and the manifest.

A shard is written under a temporary name and renamed only when complete, so a
crash never leaves a partial file under a shard's name. Tar headers carry fixed
metadata (mtime 0, no owner) so the same samples always give the same bytes.
Reading checks each shard against the manifest (sha256 and sample count) and
parses it strictly: megamem writes nothing but regular members named like
samples, so anything else is damage. A corrupt, truncated or tampered shard
stops training with its name instead of silently yielding fewer samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from megamem.durable import atomic_write
from megamem.errors import DataError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megamem-shards-v1"
SAMPLE_SUFFIX = "tokens.npy"
SAMPLE_NAME = re.compile(r"\d{12}\." + re.escape(SAMPLE_SUFFIX))
TOKEN_DTYPES = ("uint16", "uint32")          # what tokenizer.token_dtype picks
SHA256 = re.compile(r"[0-9a-f]{64}")
MEMBER_KINDS = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a directory",
                tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a fifo"}


@dataclass
class ShardInfo:
    path: str          # relative to the dataset directory
    samples: int
    tokens: int
    sha256: str


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _npy_header(sample_len: int, dtype: np.dtype) -> bytes:
    """The .npy header of a 1-D array: the same for every sample of a shard, so built once."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                  "shape": (sample_len,)})
    return buffer.getvalue()


def write_shard(directory: Path, name: str, first_key: int, samples: np.ndarray) -> ShardInfo:
    """Write samples [n, seq_len + 1] as one tar, atomically, hashing as it streams; keys are global sample numbers."""
    header = _npy_header(samples.shape[1], samples.dtype)
    digest = hashlib.sha256()
    path = directory / name
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        def write(data: bytes) -> None:
            handle.write(data)
            digest.update(data)

        size = len(header) + samples.shape[1] * samples.dtype.itemsize
        padding = b"\0" * (-size % tarfile.BLOCKSIZE)
        written = 0
        for offset, sample in enumerate(samples):
            info = tarfile.TarInfo(f"{first_key + offset:012d}.{SAMPLE_SUFFIX}")
            info.size, info.mtime, info.mode = size, 0, 0o644
            write(info.tobuf(format=tarfile.USTAR_FORMAT) + header + sample.tobytes() + padding)
            written += tarfile.BLOCKSIZE + size + len(padding)
        end = 2 * tarfile.BLOCKSIZE
        write(b"\0" * (end + (-(written + end) % tarfile.RECORDSIZE)))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return ShardInfo(name, len(samples), int(samples.size), digest.hexdigest())


def read_shard(directory: Path, info: ShardInfo, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """All samples of a shard as [samples, seq_len + 1], after checking it against the manifest."""
    path = directory / info.path

    def refuse(problem: str) -> DataError:
        return DataError(f"shard {path} {problem}. Fix: re-run megamem preprocess into {directory}")

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing. "
                        f"Fix: restore it or re-run megamem preprocess into {directory}") from None
    except OSError as err:
        raise DataError(f"shard {path} cannot be read ({err.strerror}). "
                        "Fix: check its permissions, or restore it") from None
    if not data:
        raise refuse("is empty (0 bytes: a copy or a disk may have failed)")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise refuse(f"is corrupt or truncated: its sha256 differs from {directory / MANIFEST}")
    header = _npy_header(seq_len + 1, dtype)
    size = len(header) + (seq_len + 1) * dtype.itemsize
    samples, names = [], set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            # Member by member, refusing a bad one before tarfile moves on: a negative size in a header would
            # send tarfile back to an earlier header, round and round.
            for member in tar:
                name = member.name
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    kind = MEMBER_KINDS.get(member.type, f"of tar type {member.type!r}")
                    raise refuse(f"member {name!r} is {kind}, not a regular file")
                if not SAMPLE_NAME.fullmatch(name):
                    raise refuse(f"member {name!r} is not named like a sample (12 digits, then .{SAMPLE_SUFFIX})")
                if name in names:
                    raise refuse(f"holds member {name!r} twice")
                payload = data[member.offset_data:member.offset_data + member.size]
                if len(payload) < member.size:
                    raise refuse(f"is truncated inside member {name!r}")
                if member.size != size or not payload.startswith(header):
                    raise refuse(f"member {name!r} is not a {seq_len + 1}-token {dtype} .npy array")
                names.add(name)
                samples.append(np.frombuffer(payload, dtype=dtype, offset=len(header)))
    except tarfile.TarError as err:
        raise refuse(f"is not a readable tar ({err})") from None
    if len(samples) != info.samples:
        raise refuse(f"holds {len(samples)} samples, the manifest says {info.samples}")
    return np.stack(samples) if samples else np.zeros((0, seq_len + 1), dtype=dtype)


@dataclass
class Manifest:
    directory: Path
    seq_len: int
    dtype: np.dtype
    tokenizer: dict
    shards: list[ShardInfo]
    valid_shards: list[ShardInfo]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def write_manifest(directory: Path, content: dict) -> None:
    atomic_write(directory / MANIFEST, (json.dumps(content, indent=2) + "\n").encode())


def load_manifest(directory: str | Path) -> Manifest:
    """Read DIR/manifest.json, check every field the loaders use, and that every shard it lists is present."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = " (preprocessing did not finish: re-run the same megamem preprocess command to complete it)" \
            if any(directory.glob("*.tar")) else ""
        raise DataError(f"no dataset at {directory}: {path} is missing{hint}. Fix: point data.path at the --output "
                        f"directory of megamem preprocess")
    try:
        content = json.loads(path.read_bytes())
        problem = _manifest_problem(content)
    except OSError as err:
        problem = f"it cannot be read: {err.strerror}"
    except (ValueError, RecursionError) as err:        # not UTF-8 or not JSON; RecursionError: nested too deep
        problem = f"it is not JSON: {err}"
    if problem:
        raise DataError(f"{path} is not a megamem manifest ({problem}). "
                        f"Fix: re-run megamem preprocess into {directory}")
    manifest = Manifest(directory, content["seq_len"], np.dtype(content["dtype"]), content["tokenizer"],
                        [ShardInfo(**s) for s in content["shards"]], [ShardInfo(**s) for s in content["valid_shards"]])
    for info in manifest.shards + manifest.valid_shards:
        if not (directory / info.path).is_file():
            raise DataError(f"shard {directory / info.path} listed in {path} is missing. "
                            "Fix: restore it or re-run megamem preprocess")
    return manifest


def _is_int(value) -> bool:
    return type(value) is int          # not bool, which JSON true would give, nor float


def _manifest_problem(content) -> str | None:
    """What is wrong with a parsed manifest, or None. Every field a loader reads is checked for type and range, so
    a damaged or hand-edited manifest fails when the data is opened, not as a crash (or a shard silently never
    read) in the middle of training."""
    if not isinstance(content, dict):
        return f"the top level is a JSON {type(content).__name__}, not an object"
    if content.get("format") != MANIFEST_FORMAT:
        return f"format is {content.get('format')!r}, not {MANIFEST_FORMAT!r}"
    seq_len = content.get("seq_len")
    if not _is_int(seq_len) or seq_len <= 0:
        return f"seq_len {seq_len!r} is not a positive integer"
    if content.get("dtype") not in TOKEN_DTYPES:
        return f"dtype {content.get('dtype')!r} is not one of {', '.join(TOKEN_DTYPES)}"
    tokenizer = content.get("tokenizer")
    if not (isinstance(tokenizer, dict) and isinstance(tokenizer.get("kind"), str)
            and isinstance(tokenizer.get("hash"), str) and _is_int(tokenizer.get("vocab_size"))
            and tokenizer["vocab_size"] > 0):
        return "tokenizer is not an object with a kind, a hash and a positive vocab_size"
    counts = content.get("counts")
    if not isinstance(counts, dict):
        return "counts is not an object"
    paths = set()
    for split, total in (("shards", "train_samples"), ("valid_shards", "valid_samples")):
        shards = content.get(split)
        if not isinstance(shards, list):
            return f"{split} is not a list"
        for index, shard in enumerate(shards):
            problem = _shard_problem(shard, seq_len)
            if problem:
                return f"{split}[{index}] {problem}"
            if shard["path"] in paths:
                return f"shard {shard['path']} is listed twice"
            paths.add(shard["path"])
        # A shard dropped from the list would shrink the dataset without a word: the total written beside it tells.
        samples = sum(shard["samples"] for shard in shards)
        if not _is_int(counts.get(total)) or counts[total] != samples:
            return f"{split} hold {samples} samples but counts.{total} is {counts.get(total)!r}"
    return None


def _shard_problem(shard, seq_len: int) -> str | None:
    """What is wrong with one manifest entry of a shard, or None. megamem writes no empty shard, and a shard of
    0 samples would never be read: one that holds samples would be skipped without a word."""
    if not isinstance(shard, dict) or set(shard) != {"path", "samples", "tokens", "sha256"}:
        return "is not an object of exactly path, samples, tokens and sha256"
    path, samples, tokens, sha256 = shard["path"], shard["samples"], shard["tokens"], shard["sha256"]
    if not isinstance(path, str) or not path or PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
        return f"path {path!r} is not a relative path inside the dataset directory"
    if not _is_int(samples) or samples <= 0:
        return f"samples {samples!r} is not a positive integer"
    if not _is_int(tokens) or tokens != samples * (seq_len + 1):
        return f"tokens {tokens!r} is not samples x (seq_len + 1) = {samples * (seq_len + 1)}"
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        return f"sha256 {sha256!r} is not 64 lowercase hex digits"
    return None


@dataclass
class DataSpec:
    """What the loaders need from the run's config: datasets with weights, and what they must match."""

    paths: list[str]
    weights: list[float]
    seq_len: int
    vocab_size: int
    tokenizer_hash: str
    tokenizer_name: str

    @classmethod
    def from_config(cls, data, model) -> DataSpec:
        """From the `data` and `model` sections; refuses a config without data before anything starts."""
        from megamem.data_tools.tokenizer import load_tokenizer

        sources = [(data.path, 1.0)] if data.path else [(s.path, s.weight) for s in data.sources]
        if not sources:
            raise DataError("no training data: set data.path to a megamem preprocess output "
                            "(or data.sources for a blend)")
        tokenizer = load_tokenizer(data.tokenizer)
        return cls([p for p, _ in sources], [w for _, w in sources], model.seq_len, model.vocab_size, tokenizer.hash,
                   data.tokenizer)


def open_datasets(spec: DataSpec) -> list[Manifest]:
    """Load every manifest and check it against the model and tokenizer: fail before training starts."""
    manifests = [load_manifest(Path(p)) for p in spec.paths]
    for manifest in manifests:
        where = manifest.directory
        if manifest.seq_len != spec.seq_len:
            raise DataError(f"dataset {where} holds sequences of {manifest.seq_len} tokens "
                            f"but model.seq_len is {spec.seq_len}. "
                            f"Fix: set model.seq_len={manifest.seq_len} or preprocess with --seq-len {spec.seq_len}")
        if manifest.tokenizer["hash"] != spec.tokenizer_hash:
            raise DataError(f"dataset {where} was tokenized with a different tokenizer ({manifest.tokenizer['kind']}, "
                            f"hash {manifest.tokenizer['hash'][:12]}) than data.tokenizer={spec.tokenizer_name}. "
                            f"Fix: set data.tokenizer to the one in {where / 'manifest.json'} "
                            "or re-run megamem preprocess")
        if manifest.tokenizer["vocab_size"] > spec.vocab_size:
            raise DataError(f"dataset {where} uses {manifest.tokenizer['vocab_size']} token ids "
                            "but model.vocab_size is "
                            f"{spec.vocab_size}. Fix: set model.vocab_size={manifest.tokenizer['vocab_size']}")
    return manifests
