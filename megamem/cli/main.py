"""The `megamem` command: one entry point, one subcommand per job.

Every subcommand module exposes `register(subparsers)`; its handler returns an
exit status. A user's mistake (a MegamemError: bad config, missing file, corrupt
shard) is printed as one line and exits 2 (with its traceback too under --debug);
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from megamem.cli import eval, export, flops, generate, lm_eval, plan, preprocess, reshard, train, train_tokenizer
from megamem.errors import MegamemError
from megamem.training.huge_pages import prefer_huge_pages

COMMANDS = (preprocess, train_tokenizer, train, eval, generate, lm_eval, export, reshard, flops, plan)

DESCRIPTION = """\
megamem: pretraining for MemoryFormer language models.

examples:
  megamem flops configs/memoryformer-tiny.yaml --seq-len 2048
  megamem plan configs/memoryformer-base.yaml --tp 8 --pp 1 --dp 8 --zero 1 --micro-batch 4
  megamem preprocess --input 'corpus/*.jsonl' --output data/corpus --seq-len 2048 --workers 8
  megamem train configs/memoryformer-tiny.yaml --set data.path=data/corpus --nproc 8
  megamem eval runs/mf-tiny --data data/corpus
  megamem generate runs/mf-tiny --prompt "Once upon a time" --max-new-tokens 64
  megamem reshard runs/mf-tiny --tp 2 --pp 2 --output runs/mf-tiny-tp2pp2
Run `megamem COMMAND --help` for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamem", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error too (and in every rank)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    prefer_huge_pages()
    parser = build_parser()
    args, foreign = parser.parse_known_args(argv)
    if foreign and not getattr(args, "passes_arguments_on", False):
        parser.error(f"unrecognized arguments: {' '.join(foreign)}")
    args.foreign = foreign                          # another tool's arguments (megamem lm-eval)
    if args.debug:
        os.environ["MEGAMEM_DEBUG"] = "1"           # training ranks started by megamem train inherit it
    try:
        return args.handler(args)
    except MegamemError as err:
        if args.debug:
            raise
        print(f"megamem {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
