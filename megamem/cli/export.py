"""`megamem export`: a run's checkpoint as one .safetensors file, loadable without DeepSpeed."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Consolidate the newest complete checkpoint of a run (or --checkpoint DIR) into one
.safetensors file of fp32 weights, with the run's config in its metadata. Load it
with megamem.training.export.load_exported(path) -> (model, config).

example:
  megamem export runs/smoke --output runs/smoke/model.safetensors"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a consolidated .safetensors model from a run",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--output", required=True, metavar="FILE.safetensors")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="a checkpoint directory (default: the newest)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megamem.training.export import export_model

    checkpoint = export_model(Path(args.run_dir), Path(args.output), Path(args.checkpoint) if args.checkpoint else None)
    print(f"megamem export: {checkpoint} -> {args.output}")
    return 0
