"""`megamem reshard`: a run's checkpoint as a new run that continues in another layout."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Turn the newest complete checkpoint of a run (or --checkpoint DIR), written in any
layout, into a new run directory that `megamem train` continues in the layout
given here: model weights, Adam's moments and step, the LR schedule and the data
position are carried (Adam's state from ZeRO 0-2 runs in fp32 or bf16; for ZeRO 3
or fp16 sources pass --weights-only, and Adam restarts). The data-parallel size
follows from the number of processes you train with.

example:
  megamem reshard runs/mf-tiny --tp 1 --pp 2 --output runs/mf-tiny-pp2
  megamem train runs/mf-tiny-pp2/config.yaml --nproc 2"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("reshard", help="re-cut a run's checkpoint for another tp / pp layout",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the new layout")
    parser.add_argument("--pp", type=int, required=True, help="pipeline stages of the new layout")
    parser.add_argument("--output", required=True, metavar="DIR", help="the new run directory")
    parser.add_argument("--checkpoint", default=None, metavar="DIR", help="a checkpoint directory (default: newest)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more changes to the new run's config, e.g. parallel.zero_stage=1")
    parser.add_argument("--weights-only", action="store_true",
                        help="carry the weights even where Adam's state cannot be read (Adam then restarts)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megamem.checkpoint.catalog import newest_checkpoint
    from megamem.checkpoint.universal import reshard
    from megamem.config import load_config

    run_dir = Path(args.run_dir)
    target = load_config([run_dir / "config.yaml"], [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}",
                                                     *args.overrides])
    checkpoint = Path(args.checkpoint) if args.checkpoint else newest_checkpoint(run_dir)
    written = reshard(checkpoint, target, Path(args.output), args.weights_only)
    print(f"megamem reshard: {checkpoint} -> {written} (tp={args.tp}, pp={args.pp}); continue it with: "
          f"megamem train {Path(args.output) / 'config.yaml'} --nproc N")
    return 0
