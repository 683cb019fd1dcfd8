"""One corpus preprocessed as N independent tasks and a merge, with the bytes of a one-task run.

A task takes a contiguous run of the sorted input files, balanced by size
(`task_files`), tokenizes them with its own workers and appends each document's
tokens, end-of-document included, to `tokens.bin`, and its length to
`lengths.bin`, under OUT/.tasks/task-IIIII-of-NNNNN/. Packing into samples is
global (a sample runs across document boundaries) and the validation split is
drawn by a document's number in the whole corpus, so both wait for the merge:
it reads the tasks in order, numbers their documents as one run would, and
feeds the same packers, which therefore write the same shards and manifest
whatever the number of tasks or workers. The merge reads and writes every token
once; tokenizing is the cost, and it is what the tasks spread.

A task saves its position (documents done, the two files fsynced, then
`state.json`) each time it has appended a shard's worth of tokens; one that is
killed or preempted is rerun alone, truncates its files to that position and
goes on. `done.json`, written last, marks it finished. The merge refuses to
start while a task is missing or unfinished, naming the command that finishes
it; once the manifest is written the task files are removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from megamem.data_tools.dedup import DIGEST_BYTES, first_occurrences
from megamem.data_tools.inputs import Counts, expand_inputs
from megamem.data_tools.preprocess import (
    PreprocessArgs,
    Summary,
    check_args,
    fingerprint_of,
    finish_dataset,
    in_valid_split,
    packers,
    tokenized,
)
from megamem.data_tools.progress import Progress
from megamem.data_tools.shards import MANIFEST
from megamem.data_tools.tokenizer import load_tokenizer, token_dtype
from megamem.durable import atomic_write, fsync_directory
from megamem.errors import DataError

TASKS = ".tasks"
RECORD, STATE, DONE = "task.json", "state.json", "done.json"
TOKENS, LENGTHS, DIGESTS = "tokens.bin", "lengths.bin", "digests.bin"
FEED_TOKENS = 1 << 24


def task_dir(out: Path, task: int, num_tasks: int) -> Path:
    return out / TASKS / f"task-{task:05d}-of-{num_tasks:05d}"


def task_files(files: list[Path], num_tasks: int) -> list[list[Path]]:
    """Contiguous runs of the sorted files, one per task: a file goes to the task whose share of the bytes holds
    its middle, so each task's bytes are within half a file of its share. The same split wherever it is computed."""
    sizes = [f.stat().st_size for f in files]
    total = max(sum(sizes), 1)
    parts: list[list[Path]] = [[] for _ in range(num_tasks)]
    before = 0
    for path, size in zip(files, sizes, strict=True):
        parts[min(num_tasks - 1, (2 * before + size) * num_tasks // (2 * total))].append(path)
        before += size
    return parts


def task_from_environment(task: int | None, num_tasks: int | None) -> tuple[int, int] | None:
    """(task, number of tasks): as given, else those of the SLURM array job this runs in (array indices are task
    numbers, from 0), or None: the whole corpus in one task."""
    if task is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        task = int(os.environ["SLURM_ARRAY_TASK_ID"])
    if num_tasks is None and task is not None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        num_tasks = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    if task is None and num_tasks is None:
        return None
    if task is None or num_tasks is None or not 0 <= task < num_tasks:
        raise DataError(f"--task {task} --num-tasks {num_tasks}: give both, with 0 <= task < num-tasks (a SLURM "
                        f"array rerun of some tasks is smaller than the job: pass --num-tasks N)")
    return task, num_tasks


def task_command(arguments: dict, task: int, num_tasks: int) -> str:
    """The command line that runs (or finishes) task `task`."""
    defaults = PreprocessArgs([], "", 0)
    words = ["megamem", "preprocess", "--input", *arguments["inputs"], "--output", arguments["output"],
             "--seq-len", str(arguments["seq_len"])]
    for key in ("tokenizer", "json_key", "valid_fraction", "shard_size_mb", "on_error", "dedup"):
        if arguments[key] != getattr(defaults, key):
            words += [f"--{key.replace('_', '-')}", str(arguments[key])]
    if arguments["exclude"]:
        words += ["--exclude", *arguments["exclude"]]
    return shlex.join([*words, "--task", str(task), "--num-tasks", str(num_tasks)])


def run_task(args: PreprocessArgs, task: int, num_tasks: int, progress: Progress | None = None) -> Summary:
    check_args(args)
    out = Path(args.output)
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds a finished dataset ({out / MANIFEST}). Fix: choose another --output, "
                        f"or delete {out} to rebuild it")
    files = expand_inputs(args.inputs, args.exclude)
    tokenizer = load_tokenizer(args.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    directory = task_dir(out, task, num_tasks)
    record = {"task": task, "num_tasks": num_tasks, "fingerprint": fingerprint_of(args, files, tokenizer.hash),
              "arguments": asdict(args)}
    summary = Summary()
    if _claim(directory, record):
        return _summary_of(json.loads((directory / DONE).read_text()))
    state = json.loads((directory / STATE).read_text()) if (directory / STATE).is_file() else None
    documents, tokens = (state["documents"], state["tokens"]) if state else (0, 0)
    summary.resumed_after_documents = documents
    mine = task_files(files, num_tasks)[task]
    progress = progress or Progress(total_bytes=sum(f.stat().st_size for f in mine))
    invalid_utf8_files: list[Path] = []
    threshold = max(1, int(args.shard_size_mb * 2**20) // dtype.itemsize)
    with _truncated(directory / TOKENS, tokens * dtype.itemsize) as token_file, \
            _truncated(directory / LENGTHS, documents * 8) as length_file, \
            _truncated(directory / DIGESTS, documents * DIGEST_BYTES * (args.dedup == "exact")) as digest_file:
        length, unsaved = 0, 0
        summary.tokens = tokens
        for piece, piece_tokens in tokenized(mine, args, tokenizer.eod_id, documents, summary.counts,
                                             invalid_utf8_files, progress, lambda: summary.tokens):
            token_file.write(piece_tokens.astype(dtype, copy=False).tobytes())
            length += len(piece_tokens)
            summary.tokens += len(piece_tokens)
            unsaved += len(piece_tokens)
            if piece.last:
                length_file.write(np.int64(length).tobytes())
                if piece.digest is not None:
                    digest_file.write(piece.digest)
                documents, length = documents + 1, 0
                if unsaved >= threshold:
                    _save(directory, (token_file, length_file, digest_file), documents, summary.tokens)
                    unsaved = 0
        _save(directory, (token_file, length_file, digest_file), documents, summary.tokens)
    progress.close(summary.counts.bytes_read, summary.counts.documents, summary.tokens)
    done = {"counts": asdict(summary.counts), "documents": documents, "tokens": summary.tokens,
            "invalid_utf8_files": [str(p) for p in invalid_utf8_files]}
    atomic_write(directory / DONE, json.dumps(done).encode())
    return _finished(summary)


def merge(out: Path, progress: Progress | None = None) -> Summary:
    """The shards and manifest of the whole corpus from its finished tasks."""
    started = time.monotonic()
    records = _records(out)
    args = PreprocessArgs(**records[0]["arguments"])
    files = expand_inputs(args.inputs, args.exclude)
    tokenizer = load_tokenizer(args.tokenizer)
    fingerprint = fingerprint_of(args, files, tokenizer.hash)
    if fingerprint != records[0]["fingerprint"]:
        raise DataError(f"the inputs of {out} changed after its tasks read them (sizes, times or the file list). "
                        f"Fix: delete {out / TASKS} and run the tasks again")
    dtype = token_dtype(tokenizer.vocab_size)
    for leftover in [*out.glob("*.tar"), *out.glob("*.tmp")]:      # what an interrupted merge wrote
        leftover.unlink()
    train, valid = packers(out, args, dtype)
    summary = Summary()
    done = [json.loads((task_dir(out, r["task"], r["num_tasks"]) / DONE).read_text()) for r in records]
    keep = _kept(out, records, args.dedup)
    progress = progress or Progress(total_bytes=sum(d["tokens"] for d in done) * dtype.itemsize)
    first = 0
    for record, finished in zip(records, done, strict=True):
        directory = task_dir(out, record["task"], record["num_tasks"])
        lengths = np.fromfile(directory / LENGTHS, dtype=np.int64)
        size = (directory / TOKENS).stat().st_size
        tokens = np.memmap(directory / TOKENS, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        kept = keep[first:first + len(lengths)]
        _feed(tokens, lengths, kept, first, args.valid_fraction, train, valid, summary)
        first += len(lengths)
        summary.tokens += int(lengths[kept].sum())
        summary.duplicate_documents += int((~kept).sum())
        summary.counts = Counts(**{key: getattr(summary.counts, key) + value
                                   for key, value in finished["counts"].items()})
        progress.update(summary.tokens * dtype.itemsize, summary.counts.documents, summary.tokens)
    invalid = [path for finished in done for path in finished["invalid_utf8_files"]]
    progress.close(summary.tokens * dtype.itemsize, summary.counts.documents, summary.tokens)
    finish_dataset(out, args, files, tokenizer, train, valid, summary, fingerprint, invalid)
    shutil.rmtree(out / TASKS)
    fsync_directory(out)
    summary.seconds = time.monotonic() - started
    return _finished(summary)


def _kept(out: Path, records: list[dict], dedup: str) -> np.ndarray:
    """Whether each document of the corpus, in order, is kept: with --dedup exact, the first of its text only."""
    directories = [task_dir(out, record["task"], record["num_tasks"]) for record in records]
    counts = [(d / LENGTHS).stat().st_size // 8 for d in directories]
    if dedup != "exact":
        return np.ones(sum(counts), dtype=bool)
    digests = np.concatenate([np.fromfile(d / DIGESTS, dtype=np.uint8) for d in directories])
    return first_occurrences(digests.reshape(-1, DIGEST_BYTES))


def _feed(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray, first: int, fraction: float, train, valid,
          summary) -> None:
    """One task's documents into the packers, numbered from `first` (dropped duplicates keep their numbers);
    runs of kept documents bound for the same split go in as one slice."""
    ends = np.cumsum(lengths)
    if len(ends) and ends[-1] != len(tokens):
        raise DataError("a task's tokens.bin and lengths.bin disagree: the task is damaged. Fix: delete its "
                        "directory and run the task again")
    to_valid = np.array([in_valid_split(first + i, fraction) for i in range(len(lengths))], dtype=bool)
    summary.valid_documents += int((to_valid & keep).sum())
    if not len(lengths):
        return
    where = to_valid.astype(np.int8) + 2 * ~keep           # 0 train, 1 valid, 2 or 3 dropped
    changes = np.flatnonzero(np.diff(where)) + 1
    starts = np.concatenate([[0], changes]).astype(np.int64)
    stops = np.concatenate([changes, [len(lengths)]]).astype(np.int64)
    for start, stop in zip(starts, stops, strict=True):
        if not keep[start]:
            continue
        packer = valid if to_valid[start] else train
        begin, end = (int(ends[start - 1]) if start else 0), int(ends[stop - 1])
        for at in range(begin, end, FEED_TOKENS):          # the packer copies what it holds: keep that bounded
            packer.feed(tokens[at:min(end, at + FEED_TOKENS)])


def _records(out: Path) -> list[dict]:
    """Every task's record, in order, after checking that all N exist, are finished and belong to one job."""
    found = sorted((out / TASKS).glob(f"task-*/{RECORD}")) if (out / TASKS).is_dir() else []
    if not found:
        hint = " (it already holds a finished dataset)" if (out / MANIFEST).exists() else ""
        raise DataError(f"{out} holds no preprocessing tasks to merge{hint}. Fix: run megamem preprocess ... "
                        f"--output {out} --task I --num-tasks N for every I first")
    records = [json.loads(path.read_text()) for path in found]
    num_tasks, fingerprint = records[0]["num_tasks"], records[0]["fingerprint"]
    for record in records:
        if record["num_tasks"] != num_tasks or record["fingerprint"] != fingerprint:
            raise DataError(f"{task_dir(out, record['task'], record['num_tasks'])} belongs to another split of the "
                            f"work or other inputs than {task_dir(out, 0, num_tasks).name}. Fix: delete "
                            f"{out / TASKS} and run the tasks again with one --num-tasks")
    by_task = {record["task"]: record for record in records}
    for task in range(num_tasks):
        if task not in by_task or not (task_dir(out, task, num_tasks) / DONE).is_file():
            what = "has not run" if task not in by_task else "has not finished"
            raise DataError(f"task {task} of {num_tasks} {what} ({task_dir(out, task, num_tasks)}). Fix: run "
                            f"`{task_command(records[0]['arguments'], task, num_tasks)}` (it resumes where it "
                            f"stopped), then merge again")
    return [by_task[task] for task in range(num_tasks)]


def _claim(directory: Path, record: dict) -> bool:
    """Start or resume this task's directory; True when the task already finished."""
    path = directory / RECORD
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["fingerprint"] != record["fingerprint"]:
            raise DataError(f"{directory} holds task {record['task']} of other inputs or arguments. Fix: rerun the "
                            f"command that started it, or delete {directory.parent} to start the job over")
        return (directory / DONE).is_file()
    directory.mkdir(parents=True, exist_ok=True)
    for name in (TOKENS, LENGTHS, DIGESTS, STATE, DONE):
        (directory / name).unlink(missing_ok=True)
    atomic_write(path, json.dumps(record).encode())
    return False


@contextlib.contextmanager
def _truncated(path: Path, size: int):
    """`path` opened for appending after its first `size` bytes (what the saved state vouches for)."""
    with open(path, "ab") as handle:
        if handle.tell() < size:
            raise DataError(f"{path} is shorter than its task's saved position: the task is damaged. Fix: delete "
                            f"{path.parent} and run the task again")
        handle.truncate(size)
        yield handle


def _save(directory: Path, handles, documents: int, tokens: int) -> None:
    for handle in handles:
        handle.flush()
        os.fsync(handle.fileno())
    atomic_write(directory / STATE, json.dumps({"documents": documents, "tokens": tokens}).encode())


def _summary_of(done: dict) -> Summary:
    summary = Summary(counts=Counts(**done["counts"]), tokens=done["tokens"])
    return _finished(summary)


def _finished(summary: Summary) -> Summary:
    summary.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary.workers_peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return summary

