"""`megamem train-tokenizer`: a byte-level BPE trained on the user's corpus."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Train a byte-level BPE tokenizer (Hugging Face tokenizers) with <|endoftext|> as
its end-of-document token, and save it as a tokenizer.json that
`megamem preprocess --tokenizer FILE.json` accepts.

example:
  megamem train-tokenizer --input corpus.jsonl --vocab-size 32000 --output tokenizer.json"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or quoted globs")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special token included")
    parser.add_argument("--output", required=True, metavar="FILE.json")
    parser.add_argument("--json-key", default="text", help="field of a jsonl record holding the text")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megamem.data_tools.inputs import Counts, expand_inputs, read_pieces
    from megamem.data_tools.tokenizer import train_bpe
    from megamem.errors import DataError

    if args.vocab_size < 260:
        raise DataError(f"--vocab-size must be at least 260 (256 bytes and merges), got {args.vocab_size}")
    counts = Counts()
    texts = (piece.text for path in expand_inputs(args.input)
             for piece in read_pieces(path, args.json_key, "skip", counts))
    tokenizer = train_bpe(texts, args.vocab_size, Path(args.output))
    print(f"megamem train-tokenizer: {tokenizer.vocab_size} tokens from {counts.documents:,} documents "
          f"-> {args.output}")
    return 0
