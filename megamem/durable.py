"""Writes that survive a crash or a power loss at any moment, and the checks that find what did not.

A rename is atomic but lives in the page cache until its directory is fsynced;
a file's data likewise until the file is. So: write under a temporary name,
fsync the file, rename, fsync the directory. A reader then sees the old file or
the whole new one, after a reboot too.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 16 << 20


def fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to `path.tmp`, fsync, rename, fsync the directory: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def _sha256(handle) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def fsync_and_digest(path: Path) -> dict:
    """Flush a file another writer closed to the disk, and return its size and sha256 as a checkpoint records them."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        sha256 = _sha256(handle)
    return {"bytes": path.stat().st_size, "sha256": sha256}


def digest_problem(path: Path, recorded: dict) -> str | None:
    """What is wrong with a file against its recorded size and sha256, or None when it is intact."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != recorded["bytes"]:
        return f"{path} holds {size} bytes, {recorded['bytes']} were written"
    with open(path, "rb") as handle:
        sha256 = _sha256(handle)
    if sha256 != recorded["sha256"]:
        return f"{path} is corrupt: its sha256 differs from the one recorded when it was written"
    return None
