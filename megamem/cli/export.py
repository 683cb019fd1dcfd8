"""`megamem export`: a run's checkpoint as one .safetensors file, or as a Hugging Face model directory."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Consolidate the newest complete checkpoint of a run (or --checkpoint DIR), of any
layout, into fp32 weights for one process:
  --format safetensors (default): one .safetensors file with the run's config in
      its metadata, for megamem eval / generate / lm-eval, or
      megamem.inference.export.load_exported(path) -> (model, config);
  --format hf: a directory that transformers loads without megamem, with
      AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and
      AutoTokenizer.from_pretrained(DIR): config.json, model.safetensors, the
      tokenizer and modeling_megamem.py.

examples:
  megamem export runs/smoke --output runs/smoke/model.safetensors
  megamem export runs/smoke --format hf --output runs/smoke/hf"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a consolidated model from a run (safetensors or hf)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--output", required=True, metavar="FILE.safetensors|DIR")
    parser.add_argument("--format", choices=("safetensors", "hf"), default="safetensors")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="a checkpoint directory (default: the newest)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megamem.inference.export import export_model
    from megamem.inference.hf_export import export_hf

    output = Path(args.output)
    if args.format == "hf":
        checkpoint = export_hf(Path(args.checkpoint or args.run_dir), output).source
    else:
        checkpoint = export_model(Path(args.run_dir), output, Path(args.checkpoint) if args.checkpoint else None)
    print(f"megamem export: {checkpoint} -> {output}")
    return 0
