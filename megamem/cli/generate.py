"""`megamem generate`: text from a trained model, decoded with a KV cache."""
from __future__ import annotations

import argparse
import sys

HELP = """\
Continue a prompt with a trained model (a run directory, one of its checkpoints,
or a file of megamem export). Each new token runs through the model alone, with
the keys and values of the ones before it cached; decoding stops after
--max-new-tokens, at the end-of-document token, or when model.seq_len is full.
--temperature 0 is greedy; --seed makes sampling repeatable.

example:
  megamem generate runs/cpu-smoke --prompt "def " --max-new-tokens 64
  megamem generate runs/cpu-smoke --prompt "import " --temperature 0.8 --top-p 0.95 --seed 1 --stream"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt with a trained model",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="RUN_DIR|CHECKPOINT|EXPORT")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0: greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (1: off)")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--stream", action="store_true", help="print text as it is decoded")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from megamem.data_tools.tokenizer import load_tokenizer
    from megamem.errors import MegamemError
    from megamem.inference.generate import generate
    from megamem.inference.load import load_trained

    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise MegamemError(f"--max-new-tokens {args.max_new_tokens}, --temperature {args.temperature}, --top-k "
                           f"{args.top_k}, --top-p {args.top_p}: need N >= 1, T >= 0, K >= 0 and 0 < P <= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trained = load_trained(args.model, device, kernel="auto")       # the fused kernel for the device
    tokenizer = load_tokenizer(trained.config.data.tokenizer)
    tokens: list[int] = []
    printed = [""]

    def stream(token: int) -> None:
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):         # a character whose bytes are not all decoded yet waits
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    if args.stream:
        sys.stdout.write(args.prompt)
    new = generate(trained.model, [int(i) for i in tokenizer.encode(args.prompt)], args.max_new_tokens,
                   tokenizer.vocab_size, tokenizer.eod_id, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, on_token=stream if args.stream else None)
    text = tokenizer.decode(new)
    print(text[len(printed[0]):] if args.stream else args.prompt + text)
    return 0
