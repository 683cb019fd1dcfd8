"""Finding input files and streaming documents out of them.

Inputs are jsonl (one document per line under a key) or plain text (one document
per file), optionally gzip or zstd compressed. Everything streams: a jsonl file is
read line by line and a large text file in pieces cut at line ends, so memory
stays bounded whatever the corpus size. Bad input is counted, never silently
dropped: a malformed line is skipped or fatal per `on_error`, a binary file is
skipped with a warning, and a file that cannot be read or decompressed to its
end is fatal.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import itertools
import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from megamem.errors import DataError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
COMPRESSED = {".gz", ".zst"}
TEXT_PIECE_BYTES = 1 << 20
BINARY_SNIFF_BYTES = 8192
ZSTD_READ_BYTES = 1 << 17


@dataclass
class Counts:
    """Everything the summary reports about the input side."""

    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    invalid_utf8_documents: int = 0
    binary_files: int = 0
    malformed_lines: int = 0
    missing_key_lines: int = 0
    input_bytes: int = 0
    bytes_read: int = 0          # of the input files (compressed bytes for .gz/.zst), for progress


@dataclass
class Piece:
    """Part of a document, in order. `first` starts a document; `last` is where end-of-document goes; `digest`, on
    a last piece when deduplicating, the document's key (megamem.data_tools.dedup)."""

    text: str
    first: bool
    last: bool
    digest: bytes | None = None


def _kind(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSED else path.suffixes[-1:]
    base = suffixes[0] if suffixes else ""
    if base in JSONL_SUFFIXES:
        return "jsonl"
    if base in TEXT_SUFFIXES:
        return "text"
    return None


def expand_inputs(specs: list[str], exclude: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Files, directories (searched recursively for known suffixes) and globs, sorted, without duplicates, less
    those whose path matches an `exclude` pattern (fnmatch: `*` crosses `/`, e.g. `*/site-packages/*`)."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"input glob {spec!r} matches no file. "
                                "Fix: check the pattern (quote it so the shell does not expand it)")
            found.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not matches:
                raise DataError(f"input directory {spec} holds no .jsonl or text files (suffixes: "
                                f"{', '.join(sorted(JSONL_SUFFIXES | TEXT_SUFFIXES))}, optionally .gz or .zst). "
                                "Fix: point --input at the corpus, or name its files or a glob")
            found.extend(matches)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"input not found: {spec}. Fix: pass existing files, directories or globs to --input")
    if not found:
        raise DataError("no input given. Fix: pass files, directories or globs to --input")
    kept = [p for p in found if not any(fnmatch.fnmatch(str(p), pattern) for pattern in exclude)]
    if not kept:
        raise DataError(f"--exclude {' '.join(exclude)} leaves none of the {len(found)} input files. Fix: exclude "
                        f"less, or check the patterns (fnmatch, matched against whole paths)")
    return list(dict.fromkeys(p.resolve() for p in kept))


def _open(raw: IO[bytes], path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if path.suffix == ".zst":
        return io.BufferedReader(_ZstdFrames(raw, path))
    return raw


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in `raw`, refusing a file that ends inside a frame.

    python-zstandard's own readers hand back a truncated file's bytes as if it were whole, so an interrupted
    download would pass as a shorter corpus; here each frame must reach its end.
    """

    def __init__(self, raw: IO[bytes], path: Path):
        import zstandard

        self.raw, self.path = raw, path
        self.decompressor, self.error = zstandard.ZstdDecompressor(), zstandard.ZstdError
        self.frame = self.decompressor.decompressobj()
        self.in_frame = False            # the current frame has begun and not ended
        self.out, self.at = b"", 0       # decompressed bytes, and how many of them were handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.out):
            data = b""
            if self.frame.eof:           # what follows an ended frame begins the next one
                data = self.frame.unused_data
                self.frame, self.in_frame = self.decompressor.decompressobj(), False
            data = data or self.raw.read(ZSTD_READ_BYTES)
            if not data:
                if self.in_frame:
                    raise DataError(f"input {self.path} is truncated: it ends inside a zstd frame. "
                                    "Fix: download or compress it again, or leave it out of --input")
                return 0
            try:
                self.out, self.at = self.frame.decompress(data), 0
            except self.error as err:
                raise DataError(f"input {self.path} is not valid zstd ({err}). "
                                "Fix: download or compress it again, or leave it out of --input") from None
            self.in_frame = not self.frame.eof
        size = min(len(buffer), len(self.out) - self.at)
        buffer[:size] = self.out[self.at:self.at + size]
        self.at += size
        return size


def read_pieces(path: Path, json_key: str, on_error: str, counts: Counts) -> Iterator[Piece]:
    """Yield the pieces of every non-empty document of `path`, in order."""
    counts.files += 1
    size = path.stat().st_size
    counts.input_bytes += size
    before = counts.bytes_read
    try:
        with open(path, "rb") as raw, _open(raw, path) as stream:
            pieces = (_jsonl_pieces(path, stream, json_key, on_error, counts) if _kind(path) == "jsonl"
                      else _text_pieces(path, stream, counts))
            for piece in pieces:
                counts.bytes_read = before + raw.tell()
                yield piece
    except (OSError, EOFError, zlib.error) as err:       # unreadable, or a damaged or truncated gzip file
        raise DataError(f"input {path} cannot be read ({err}). "
                        "Fix: download or compress it again, or leave it out of --input") from None
    counts.bytes_read = before + size


def _jsonl_pieces(path: Path, stream: IO[bytes], json_key: str, on_error: str, counts: Counts) -> Iterator[Piece]:
    for lineno, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            invalid = False
        except UnicodeDecodeError:
            line, invalid = raw.decode("utf-8", errors="replace"), True
        try:
            record = json.loads(line)
        except ValueError as err:
            counts.malformed_lines += 1
            _bad(f"{path}:{lineno}: malformed JSON line ({err})", on_error)
            continue
        if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
            counts.missing_key_lines += 1
            _bad(f"{path}:{lineno}: no string under key {json_key!r} (use --json-key to pick the text field)", on_error)
            continue
        counts.documents += 1
        counts.invalid_utf8_documents += invalid
        text = record[json_key]
        if not text.strip():
            counts.empty_documents += 1
            continue
        yield Piece(text, first=True, last=True)


def _text_pieces(path: Path, stream: IO[bytes], counts: Counts) -> Iterator[Piece]:
    """A text file is one document, read in pieces of about TEXT_PIECE_BYTES cut at line ends.

    Leading whitespace-only pieces are held back until the document proves non-empty. A file with a NUL byte in
    its first 8 KiB is binary (or UTF-16), as git and grep judge it: its bytes as UTF-8 would train on noise.
    """
    first = stream.read(TEXT_PIECE_BYTES)
    if b"\0" in first[:BINARY_SNIFF_BYTES]:
        counts.binary_files += 1
        print(f"warning: {path} looks binary (a NUL byte in its first {BINARY_SNIFF_BYTES // 1024} KiB); skipped",
              file=sys.stderr)
        return
    counts.documents += 1
    invalid = False
    held: list[str] = []
    started = False
    previous: str | None = None
    previous_first = True
    for block in itertools.chain([first], iter(lambda: stream.read(TEXT_PIECE_BYTES), b"")):
        block += stream.readline()
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            text, invalid = block.decode("utf-8", errors="replace"), True
        if not started:
            held.append(text)
            if not text.strip():
                continue
            started, text = True, "".join(held)
        if previous is not None:
            yield Piece(previous, first=previous_first, last=False)
        previous_first = previous is None
        previous = text
    counts.invalid_utf8_documents += invalid
    if previous is None:
        counts.empty_documents += 1
        return
    yield Piece(previous, first=previous_first, last=True)


def _bad(message: str, on_error: str) -> None:
    if on_error == "fail":
        raise DataError(f"{message}. Fix the input, or pass --on-error skip to skip and count such lines")
    print(f"warning: {message}; skipped", file=sys.stderr)
