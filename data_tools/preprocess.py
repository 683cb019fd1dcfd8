"""Corpus -> packed token shards, streaming, in parallel, resumable.

The pipeline: read pieces of documents in a fixed order (inputs.py), tokenize
batches of them in worker processes with at most 2 x workers batches in flight
(memory stays bounded whatever the corpus size), take results back in
submission order (so the bytes written do not depend on the worker count), and
pack each split's token stream into samples of seq_len + 1 tokens (documents
joined by end-of-document) written as shards.

Resuming: after each completed shard, at the next document boundary, the
position (documents done, each split's pending tokens and shard list) is saved
to a state file. A re-run with the same arguments skips the documents already
packed and finishes; the manifest, written last, never lists a partial shard.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megamem.data_tools.dedup import MODES as DEDUP_MODES
from megamem.data_tools.dedup import DocumentDigest
from megamem.data_tools.inputs import Counts, Piece, expand_inputs, read_pieces
from megamem.data_tools.packer import Packer
from megamem.data_tools.progress import Progress
from megamem.data_tools.shards import MANIFEST, write_manifest
from megamem.data_tools.tokenizer import describe, load_tokenizer, token_dtype
from megamem.durable import atomic_write
from megamem.errors import DataError

STATE = ".preprocess-state.json"
BATCH_CHARS = 1 << 20


@dataclass
class PreprocessArgs:
    inputs: list[str]
    output: str
    seq_len: int
    tokenizer: str = "byte"
    workers: int = 1
    json_key: str = "text"
    valid_fraction: float = 0.01
    shard_size_mb: float = 64.0
    on_error: str = "skip"
    exclude: list[str] = field(default_factory=list)
    dedup: str = "none"             # or "exact": megamem.data_tools.dedup


@dataclass
class Summary:
    counts: Counts = field(default_factory=Counts)
    tokens: int = 0
    train_samples: int = 0
    valid_samples: int = 0
    train_shards: int = 0
    valid_shards: int = 0
    valid_documents: int = 0
    duplicate_documents: int = 0
    dropped_tokens: int = 0
    resumed_after_documents: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    workers_peak_rss_mb: float = 0.0


_worker_tokenizer = None


def _init_worker(spec: str) -> None:
    """A worker is one core: --workers is the parallelism, so `tokenizers` gets one thread (before its first use,
    when it sizes its pool)."""
    global _worker_tokenizer
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _worker_tokenizer = load_tokenizer(spec)


def _tokenize(texts: list[str]) -> list[np.ndarray]:
    return _worker_tokenizer.encode_batch(texts)


def _batches(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _ordered_map(batches: Iterator[list[Piece]], spec: str,
                 workers: int) -> Iterator[tuple[list[Piece], list[np.ndarray]]]:
    """Tokenize batches in order; at most 2 x workers batches in flight."""
    if workers <= 1:
        _init_worker(spec)
        for batch in batches:
            yield batch, _tokenize([p.text for p in batch])
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        window: collections.deque = collections.deque()
        for batch in batches:
            window.append((batch, pool.apply_async(_tokenize, ([p.text for p in batch],))))
            if len(window) >= 2 * workers:
                done, result = window.popleft()
                yield done, result.get()
        while window:
            done, result = window.popleft()
            yield done, result.get()


def in_valid_split(document: int, fraction: float) -> bool:
    """A fixed pseudo-random choice per document number: the same whatever the worker count."""
    digest = hashlib.blake2b(document.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def fingerprint_of(args: PreprocessArgs, files: list[Path], tokenizer_hash: str) -> str:
    """What determines the output bytes (the worker count does not); an input changed since an interrupted run
    changes it, so that run is not resumed over different data."""
    content = {"files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files], "seq_len": args.seq_len,
               "tokenizer": tokenizer_hash,
               "json_key": args.json_key, "valid_fraction": args.valid_fraction, "shard_size_mb": args.shard_size_mb,
               "on_error": args.on_error}
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def preprocess(args: PreprocessArgs, progress: Progress | None = None) -> Summary:
    started = time.monotonic()
    check_args(args)
    files = expand_inputs(args.inputs, args.exclude)
    tokenizer = load_tokenizer(args.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint_of(args, files, tokenizer.hash)
    state = _previous_state(out, fingerprint)
    for leftover in out.glob("*.tmp"):
        leftover.unlink()

    train, valid = packers(out, args, dtype)
    summary = Summary()
    skip = 0
    if state:
        train.restore(state["train"])
        valid.restore(state["valid"])
        skip, summary.tokens, summary.valid_documents = state["documents"], state["tokens"], state["valid_documents"]
        summary.resumed_after_documents = skip

    counts = summary.counts
    progress = progress or Progress(total_bytes=sum(f.stat().st_size for f in files))
    invalid_utf8_files: list[Path] = []
    document = skip - 1
    wrote = False
    seen: set[bytes] = set()            # --dedup exact: every document's digest (a resumed run reads them again)
    held: list[np.ndarray] = []         # a document's tokens until its digest is known
    for piece, tokens in tokenized(files, args, tokenizer.eod_id, skip, counts, invalid_utf8_files, progress,
                                   lambda: summary.tokens, seen.add):
        if piece.first:
            document += 1
            to_valid, counted = in_valid_split(document, args.valid_fraction), False
        if args.dedup == "exact":
            held.append(tokens)
            if not piece.last:
                continue
            tokens, held = np.concatenate(held), []
            if piece.digest in seen:
                summary.duplicate_documents += 1
                continue
            seen.add(piece.digest)
        if not counted:
            summary.valid_documents += to_valid
            counted = True
        summary.tokens += len(tokens)
        wrote |= (valid if to_valid else train).feed(tokens)
        if piece.last and wrote:
            _save_state(out, fingerprint, document + 1, summary, train, valid)
            wrote = False

    progress.close(counts.bytes_read, counts.documents, summary.tokens)
    finish_dataset(out, args, files, tokenizer, train, valid, summary, fingerprint, invalid_utf8_files)
    (out / STATE).unlink(missing_ok=True)
    _remove_pending(out, keep=set())
    summary.seconds = time.monotonic() - started
    summary.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary.workers_peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return summary


def tokenized(files: list[Path], args: PreprocessArgs, eod_id: int, skip: int, counts: Counts,
              invalid_utf8_files: list[Path], progress: Progress, tokens_so_far,
              skipped_digest=None) -> Iterator[tuple[Piece, np.ndarray]]:
    """Every piece of the documents of `files` after the first `skip`, in order, with its tokens (end-of-document
    after a document's last piece); `counts` and `invalid_utf8_files` count all of them, the skipped included.
    With --dedup exact a last piece carries its document's digest, and a skipped document's goes to
    `skipped_digest`."""
    def pieces() -> Iterator[Piece]:
        document, digest = -1, None
        for path in files:
            invalid_before = counts.invalid_utf8_documents
            for piece in read_pieces(path, args.json_key, args.on_error, counts):
                document += piece.first
                if args.dedup == "exact":
                    digest = DocumentDigest() if piece.first else digest
                    digest.update(piece.text)
                    if piece.last:
                        piece.digest = digest.digest()
                        if document < skip and skipped_digest is not None:
                            skipped_digest(piece.digest)
                if document >= skip:
                    yield piece
            if counts.invalid_utf8_documents > invalid_before:
                invalid_utf8_files.append(path)

    eod = np.array([eod_id], dtype=np.int64)
    for batch, token_lists in _ordered_map(_batches(pieces()), args.tokenizer, args.workers):
        for piece, tokens in zip(batch, token_lists, strict=True):
            yield piece, np.concatenate([tokens, eod]) if piece.last else tokens
        progress.update(counts.bytes_read, counts.documents, tokens_so_far())


def packers(out: Path, args: PreprocessArgs, dtype: np.dtype) -> tuple[Packer, Packer]:
    sample_len = args.seq_len + 1
    per_shard = max(1, int(args.shard_size_mb * 2**20) // (sample_len * dtype.itemsize))
    return Packer("train", out, sample_len, per_shard, dtype), Packer("valid", out, sample_len, per_shard, dtype)


def finish_dataset(out: Path, args: PreprocessArgs, files: list[Path], tokenizer, train: Packer, valid: Packer,
                   summary: Summary, fingerprint: str, invalid_utf8_files: list[str | Path]) -> None:
    """Both splits' last shards, the checks and warnings on what was read, and the manifest, written last."""
    train.finish()
    valid.finish()
    summary.train_samples, summary.valid_samples = train.samples_written, valid.samples_written
    summary.train_shards, summary.valid_shards = len(train.shards), len(valid.shards)
    summary.dropped_tokens = train.dropped_tokens + valid.dropped_tokens
    _check_not_empty(summary, args)
    if invalid_utf8_files:
        print(f"warning: {summary.counts.invalid_utf8_documents} documents are not valid UTF-8 (files: "
              f"{len(invalid_utf8_files)}, the first: {invalid_utf8_files[0]}); their bad bytes became U+FFFD. "
              "Re-encode those files as UTF-8 if that loses text", file=sys.stderr)
    write_manifest(out, _manifest(args, files, tokenizer, train.dtype, train, valid, summary, fingerprint))


def check_args(args: PreprocessArgs) -> None:
    if args.seq_len <= 0:
        raise DataError(f"--seq-len must be positive, got {args.seq_len}")
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    if not 0.0 <= args.valid_fraction < 1.0:
        raise DataError(f"--valid-fraction must lie in [0, 1), got {args.valid_fraction}")
    if args.shard_size_mb <= 0:
        raise DataError(f"--shard-size-mb must be positive, got {args.shard_size_mb}")
    if args.dedup not in DEDUP_MODES:
        raise DataError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {args.dedup}")
    if args.on_error not in ("skip", "fail"):
        raise DataError(f"--on-error must be skip or fail, got {args.on_error}")


def _check_not_empty(summary: Summary, args: PreprocessArgs) -> None:
    """Refuse a corpus that gives no training sample (no text, every line skipped, or too few tokens) before its
    manifest is written: training on it could only fail later, further from the cause."""
    if summary.train_samples:
        return
    c = summary.counts
    raise DataError(f"the inputs give no training sample of {args.seq_len + 1} tokens ({c.files} files, "
                    f"{c.documents - c.empty_documents} non-empty documents, {summary.tokens} tokens; "
                    f"{c.malformed_lines + c.missing_key_lines} jsonl lines and {c.binary_files} binary files skipped; "
                    f"{summary.valid_documents} documents went to validation). "
                    "Fix: add text, check --input and --json-key, or lower --seq-len")


def _previous_state(out: Path, fingerprint: str) -> dict | None:
    """The saved position of an interrupted run with the same arguments, if any."""
    manifest = out / MANIFEST
    if manifest.exists():
        raise DataError(f"{out} already holds a finished dataset ({manifest}). Fix: choose another --output, "
                        f"or delete {out} to rebuild it")
    path = out / STATE
    if not path.exists():
        if any(out.glob("*.tar")):
            raise DataError(f"{out} holds shards but no {STATE} from megamem preprocess. "
                            "Fix: choose an empty --output directory")
        return None
    state = json.loads(path.read_text())
    if state.get("fingerprint") != fingerprint:
        raise DataError(f"{out} holds an unfinished run with other inputs or arguments. "
                        f"Fix: re-run that exact command to finish it, or delete {out} to start over")
    return state


def _save_state(out: Path, fingerprint: str, documents: int, summary: Summary, train: Packer, valid: Packer) -> None:
    """Pending tokens first, under new names; then the state that names them; then the old pending files go."""
    state = {"fingerprint": fingerprint, "documents": documents, "tokens": summary.tokens,
             "valid_documents": summary.valid_documents, "train": train.save(documents), "valid": valid.save(documents)}
    atomic_write(out / STATE, json.dumps(state).encode())
    _remove_pending(out, keep={state["train"]["pending"], state["valid"]["pending"]})


def _remove_pending(out: Path, keep: set[str]) -> None:
    for path in out.glob(".pending-*.npy"):
        if path.name not in keep:
            path.unlink()


def _manifest(args, files, tokenizer, dtype, train: Packer, valid: Packer, summary: Summary, fingerprint: str) -> dict:
    counts = asdict(summary.counts)
    counts.update(tokens=summary.tokens, train_samples=summary.train_samples, valid_samples=summary.valid_samples,
                  valid_documents=summary.valid_documents, duplicate_documents=summary.duplicate_documents,
                  dropped_tokens=summary.dropped_tokens)
    return {
        "format": "megamem-shards-v1",
        "seq_len": args.seq_len,
        "sample_len": args.seq_len + 1,
        "dtype": dtype.name,
        "tokenizer": describe(tokenizer),
        "shards": [asdict(s) for s in train.shards],
        "valid_shards": [asdict(s) for s in valid.shards],
        "sources": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
        "counts": counts,
        "fingerprint": fingerprint,
        "arguments": recorded_arguments(args),
    }


def recorded_arguments(args: PreprocessArgs) -> dict:
    """The arguments that decide the output's bytes: not where it goes, nor how many workers made it."""
    return {key: value for key, value in asdict(args).items() if key not in ("output", "workers")}
