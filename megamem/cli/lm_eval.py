"""`megamem lm-eval`: lm-evaluation-harness with megamem's model backend registered."""
from __future__ import annotations

import argparse

HELP = """\
Run lm-evaluation-harness (pip install lm-eval) on a trained model: every
argument after `lm-eval` goes to lm-eval's own CLI, with a backend named
`megamem` registered whose --model_args path= takes a run directory, a checkpoint
or a file of megamem export.

example (the paper's six tasks):
  megamem lm-eval --model megamem --model_args path=runs/mf-tiny \\
      --tasks piqa,winogrande,wsc273,arc_easy,arc_challenge,logiqa --batch_size 16"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("lm-eval", help="lm-evaluation-harness on a trained model (lm-eval's arguments)",
                                   add_help=False, description=HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=run, passes_arguments_on=True)


def run(args: argparse.Namespace) -> int:
    from megamem.errors import MegamemError

    try:
        from megamem.inference.lm_eval_adapter import run_lm_eval
    except ImportError as err:
        raise MegamemError(f"lm-evaluation-harness is not installed ({err}). Fix: pip install lm-eval") from None
    return run_lm_eval(args.foreign)
