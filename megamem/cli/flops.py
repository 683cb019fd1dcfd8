"""`megamem flops`: multiply-accumulates per block and per model."""
from __future__ import annotations

import argparse
import json

from megamem.cli.common import add_config_arguments, config_from_args, human

HELP = """\
Multiply-accumulates (MACs) of one block and of the whole model for one sequence,
in two columns:
  counted        from the built model's layers: a Linear d_in x d_out costs
                 d_in*d_out per token, a Memory Layer K*d_out (one multiply-add
                 per retrieved element), attention 2 s^2 d per sequence;
  paper formula  2 s^2 d + 12 s d^2 (dense), 2 s^2 d + 6 K s d (MemoryFormer),
                 the approximation behind Table 1 of the MemoryFormer paper.
The columns differ for MemoryFormer: counted, its Memory Block costs 2.25 K d
per token (tau = 8), the formula assumes 3 K d. Both are printed on purpose.

example:
  megamem flops configs/memoryformer-tiny.yaml --seq-len 2048 --json"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("flops", help="MACs per block and per model, counted and by the paper's formula",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length s (default: model.seq_len)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megamem.flops import flops_report

    config = config_from_args(args)
    report = flops_report(config, args.seq_len or config.model.seq_len)
    print(json.dumps(report, indent=2) if args.json else render(report, args.configs))
    return 0


def render(report: dict, configs: list[str]) -> str:
    block, formula, model = report["block"], report["paper_formula"], report["model"]
    lines = [f"{' + '.join(configs)}: {report['arch']}, {report['num_layers']} blocks, s = {report['seq_len']}",
             f"{'MACs per sequence':<28}{'counted':>16}{'paper formula':>16}"]
    for label, key in (("block attention", "attention_macs"), ("block non-attention", "non_attention_macs"),
                       ("block total", "total_macs")):
        lines.append(f"{label:<28}{human(block[key]):>16}{human(formula[key]):>16}")
    lines.append(f"{'model total (blocks + head)':<28}{human(model['total_macs']):>16}"
                 f"{human(model['paper_formula']['total_macs']):>16}")
    lines.append(f"training FLOPs per token (6 x counted MACs): {human(model['training_flops_per_token'])}")
    return "\n".join(lines)
