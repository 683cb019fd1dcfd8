"""`megamem plan`: parameters and memory per rank of a parallel layout."""
from __future__ import annotations

import argparse
import json

from megamem.cli.common import add_config_arguments, config_from_args, human

HELP = """\
Parameters (tables and the rest, whole model and per rank) and bytes per rank for
weights, gradients, optimizer state and activations, for a layout of tp x pp x dp
ranks with ZeRO stage Z, and whether the busiest rank fits in --gpu-mem GiB.
Use it to size a run before queueing it.

example:
  megamem plan configs/memoryformer-base.yaml --tp 8 --pp 1 --dp 8 --zero 1 --micro-batch 4"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="parameters and memory per rank for a parallel layout",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU (default 80)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megamem.plan import plan_report

    args.overrides = [*args.overrides, f"parallel.tp={args.tp}", f"parallel.pp={args.pp}",
                      f"parallel.zero_stage={args.zero}"]
    config = config_from_args(args)
    report = plan_report(config, args.tp, args.pp, args.dp, args.zero, args.micro_batch, args.gpu_mem)
    print(json.dumps(report, indent=2) if args.json else render(report, args.configs))
    return 0


def render(report: dict, configs: list[str]) -> str:
    layout = report["layout"]
    lines = [f"{' + '.join(configs)}: tp={layout['tp']} pp={layout['pp']} dp={layout['dp']} "
             f"zero={layout['zero_stage']} "
             f"micro-batch={layout['micro_batch']} x {layout['seq_len']} tokens, {layout['precision']}, "
             f"{layout['world_size']} ranks",
             f"{'parameters':<22}{'whole model':>14}{'per rank':>14}",
             f"{'  tables':<22}{human(report['table_params']):>14}{human(report['per_rank_table_params']):>14}",
             f"{'  total':<22}{human(report['total_params']):>14}{human(report['per_rank_params']):>14}",
             f"bytes on the busiest rank (stage {report['worst_stage']})"]
    for key, value in report["per_rank_bytes"].items():
        lines.append(f"  {key.replace('_', ' '):<20}{value / 2**30:>12.2f} GiB")
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {report['gpu_mem_gib']:g} GiB per GPU")
    return "\n".join(lines)
