"""`megamem preprocess`: a raw corpus into WebDataset token shards."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Tokenize a corpus (jsonl, text files, directories, globs; .gz and .zst too) into
WebDataset tar shards of packed samples of seq_len + 1 tokens, a validation split
chosen by document, and DIR/manifest.json. Streams: memory stays bounded whatever
the corpus size. Output bytes do not depend on --workers. If the command is
interrupted, run it again unchanged: it resumes and finishes.

On a cluster, spread it: each of N tasks (--task I --num-tasks N, or a SLURM array
job's own task id and count) tokenizes a part of the inputs under DIR/.tasks, and
--merge DIR then writes the shards and manifest, byte for byte those of one task;
a task that was killed is rerun alone and resumes (launchers/slurm/preprocess.sbatch).

examples:
  megamem preprocess --input '/usr/lib/python3*/**/*.py' --output data/stdlib --seq-len 128 --workers 2
  megamem preprocess --input 'corpus/*.jsonl.zst' --output data/c --seq-len 2048 --task 3 --num-tasks 8
  megamem preprocess --merge data/c"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("preprocess", help="tokenize a corpus into packed token shards",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="PATH", help="files, directories or quoted globs")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                        help="leave out input files whose path matches (fnmatch), e.g. '*/site-packages/*'")
    parser.add_argument("--output", metavar="DIR", help="directory for shards and manifest.json")
    parser.add_argument("--seq-len", type=int,
                        help="tokens per training sequence (samples hold seq_len + 1)")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (default) or the path of a tokenizer.json")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--json-key", default="text", help="field of a jsonl record holding the text (default text)")
    parser.add_argument("--valid-fraction", type=float, default=0.01, help="fraction of documents for validation")
    parser.add_argument("--shard-size-mb", type=float, default=64.0, help="target shard size (default 64)")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                        help="malformed jsonl lines: skip and count, or stop")
    parser.add_argument("--dedup", choices=("none", "exact"), default="none",
                        help="exact: drop a document whose text (whitespace collapsed) came before (default none)")
    parser.add_argument("--task", type=int, default=None, metavar="I",
                        help="run task I of --num-tasks (default: SLURM_ARRAY_TASK_ID; arrays are numbered from 0)")
    parser.add_argument("--num-tasks", type=int, default=None, metavar="N",
                        help="tasks the work is split into (default: SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("--merge", metavar="DIR", default=None,
                        help="write DIR's shards and manifest from its finished tasks (no other option)")
    parser.set_defaults(handler=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    from megamem.data_tools.preprocess import PreprocessArgs, preprocess
    from megamem.data_tools.preprocess_tasks import merge, run_task, task_from_environment

    if args.merge is not None:
        if args.input or args.output or args.seq_len or args.task is not None or args.num_tasks is not None:
            args.parser.error("--merge DIR takes no other option: the tasks recorded theirs")
        print(render(merge(Path(args.merge)), args.merge))
        return 0
    missing = [flag for flag, value in (("--input", args.input), ("--output", args.output),
                                        ("--seq-len", args.seq_len)) if value is None]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    spec = PreprocessArgs(args.input, args.output, args.seq_len, args.tokenizer, args.workers, args.json_key,
                          args.valid_fraction, args.shard_size_mb, args.on_error, args.exclude, args.dedup)
    task = task_from_environment(args.task, args.num_tasks)
    if task is None:
        print(render(preprocess(spec), args.output))
        return 0
    summary = run_task(spec, *task)
    c = summary.counts
    print(f"megamem preprocess: task {task[0]} of {task[1]} done: {c.files:,} files, {c.documents:,} documents, "
          f"{summary.tokens:,} tokens; when every task is done: megamem preprocess --merge {args.output}")
    return 0


def render(summary, output: str) -> str:
    c = summary.counts
    rows = [("files", c.files), ("documents", c.documents), ("  empty, skipped", c.empty_documents),
            ("  invalid UTF-8, replaced", c.invalid_utf8_documents),
            ("  validation documents", summary.valid_documents),
            ("  duplicates, dropped", summary.duplicate_documents),
            ("malformed jsonl lines", c.malformed_lines), ("jsonl lines without the key", c.missing_key_lines),
            ("tokens", summary.tokens), ("train samples", summary.train_samples),
            ("valid samples", summary.valid_samples),
            ("train shards", summary.train_shards), ("valid shards", summary.valid_shards),
            ("tokens dropped (last partial sample)", summary.dropped_tokens),
            ("input MB", f"{c.input_bytes / 1e6:.1f}"), ("seconds", f"{summary.seconds:.1f}"),
            ("tokens per second", f"{summary.tokens / max(summary.seconds, 1e-9):,.0f}"),
            ("peak RSS MB (main / largest worker)", f"{summary.peak_rss_mb:.0f} / {summary.workers_peak_rss_mb:.0f}")]
    if summary.resumed_after_documents:
        rows.insert(0, ("resumed after documents", summary.resumed_after_documents))
    width = max(len(label) for label, _ in rows)
    lines = [f"megamem preprocess: wrote {output}/manifest.json"]
    lines += [f"  {label:<{width}}  {value:>14,}" if isinstance(value, int) else f"  {label:<{width}}  {value:>14}"
              for label, value in rows]
    return "\n".join(lines)
