"""Token shards on disk: WebDataset tar files of `.tokens.npy` samples, and the manifest.

A shard is written under a temporary name and renamed only when complete, so a
crash never leaves a partial file under a shard's name. Tar headers carry fixed
metadata (mtime 0, no owner) so the same samples always give the same bytes.
Reading checks each shard against the manifest (sha256 and sample count), so a
corrupt or truncated shard stops training with its name instead of silently
yielding fewer samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamem.errors import DataError

MANIFEST = "manifest.json"
SAMPLE_SUFFIX = "tokens.npy"


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


def atomic_write(path: Path, data: bytes) -> None:
    """Write to `path.tmp`, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_shard(directory: Path, info: ShardInfo, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """All samples of a shard as [samples, seq_len + 1], after checking it against the manifest."""
    from webdataset.tariterators import tar_file_iterator

    path = directory / info.path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing. "
                        f"Fix: restore it or re-run megamem preprocess into {directory}") from None
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise DataError(f"shard {path} is corrupt or truncated: its sha256 differs from {directory / MANIFEST}. "
                        f"Fix: re-run megamem preprocess into {directory}")
    header = _npy_header(seq_len + 1, dtype)
    size = len(header) + (seq_len + 1) * dtype.itemsize
    samples = []
    try:
        for member in tar_file_iterator(io.BytesIO(data)):
            payload = member["data"]
            if len(payload) != size or not payload.startswith(header):
                raise ValueError(f"member {member['fname']} is not a {seq_len + 1}-token {dtype} .npy array")
            samples.append(np.frombuffer(payload, dtype=dtype, offset=len(header)))
    except Exception as err:
        raise DataError(f"shard {path} cannot be read ({err}). "
                        f"Fix: re-run megamem preprocess into {directory}") from None
    if len(samples) != info.samples:
        raise DataError(f"shard {path} holds {len(samples)} samples, the manifest says {info.samples}. "
                        f"Fix: re-run megamem preprocess into {directory}")
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
    """Read DIR/manifest.json and check that every shard it lists is present with its size."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = " (preprocessing did not finish: re-run the same megamem preprocess command to complete it)" \
            if any(directory.glob("*.tar")) else ""
        raise DataError(f"no dataset at {directory}: {path} is missing{hint}. Fix: point data.path at the --output "
                        f"directory of megamem preprocess")
    try:
        content = json.loads(path.read_text())
        manifest = Manifest(directory, int(content["seq_len"]), np.dtype(content["dtype"]), content["tokenizer"],
                            [ShardInfo(**s) for s in content["shards"]],
                            [ShardInfo(**s) for s in content["valid_shards"]])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a megamem manifest ({err!r}). "
                        f"Fix: re-run megamem preprocess into {directory}") from None
    for info in manifest.shards + manifest.valid_shards:
        if not (directory / info.path).is_file():
            raise DataError(f"shard {directory / info.path} listed in {path} is missing. "
                            "Fix: restore it or re-run megamem preprocess")
    return manifest
