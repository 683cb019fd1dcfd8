"""`megamem eval`: loss, perplexity, bits per token and per byte of a trained model on a dataset."""
from __future__ import annotations

import argparse
import dataclasses
import json

HELP = """\
Evaluate a trained model (a run directory, one of its checkpoints, or a file of
megamem export) on a megamem preprocess dataset: mean next-token loss,
perplexity, bits per token, bits per byte (comparable across tokenizers) and the
tokens evaluated. The validation split is read in the order and batches training
validates with (train.micro_batch_size x train.eval_steps by default), so a run's
own validation split gives the last valid_loss in its metrics.jsonl.

example:
  megamem eval runs/cpu-smoke --data data/stdlib
  megamem eval runs/cpu-smoke/checkpoints/step-00000400 --data data/stdlib --max-batches 100 --json"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="loss, perplexity and bits per byte of a trained model",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="RUN_DIR|CHECKPOINT|EXPORT")
    parser.add_argument("--data", required=True, metavar="SHARDS", help="a megamem preprocess output directory")
    parser.add_argument("--split", choices=("valid", "train"), default="valid")
    parser.add_argument("--max-batches", type=int, default=None, metavar="N",
                        help="batches to evaluate (default: the run's train.eval_steps)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="sequences per batch (default: the run's train.micro_batch_size)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from megamem.data_tools.loader import TokenBatches, valid_batches
    from megamem.data_tools.shards import DataSpec, open_datasets
    from megamem.data_tools.tokenizer import load_tokenizer
    from megamem.errors import MegamemError
    from megamem.inference.evaluate import evaluate
    from megamem.inference.load import load_trained

    for flag, value in (("--max-batches", args.max_batches), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise MegamemError(f"{flag} must be at least 1, got {value}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trained = load_trained(args.model, device)
    config = trained.config
    data = dataclasses.replace(config.data, path=args.data, sources=[])
    manifests = open_datasets(DataSpec.from_config(data, config.model))     # the model's seq_len and tokenizer
    size = args.batch_size or config.train.micro_batch_size
    count = args.max_batches or config.train.eval_steps
    batches = valid_batches(manifests, size, 0, 1, count) if args.split == "valid" else \
        iter(TokenBatches(manifests, [1.0], "train", size, config.run.seed, 0, 1, max_batches=count))
    result = evaluate(trained.model, batches, load_tokenizer(config.data.tokenizer).token_bytes(), device)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"megamem eval: {trained.source} on {args.data} ({args.split}, {result.tokens:,} tokens)")
    for name, value in (("loss", f"{result.loss:.4f}"), ("perplexity", f"{result.perplexity:.2f}"),
                        ("bits per token", f"{result.bits_per_token:.4f}"),
                        ("bits per byte", f"{result.bits_per_byte:.4f}")):
        print(f"  {name:<16}{value:>12}")
    return 0
