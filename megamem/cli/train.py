"""`megamem train`: one process in-process, or N local ranks under megamem.training.supervisor."""
from __future__ import annotations

import argparse
from pathlib import Path

from megamem.cli.common import add_config_arguments, config_from_args

HELP = """\
Train a model on megamem preprocess shards. One process runs in this process;
--nproc N starts and watches N ranks on this machine (gloo on CPU). Outputs go to
run.dir: config.yaml, metrics.jsonl, tensorboard/, checkpoints/. SIGTERM, SIGUSR1
or a first Ctrl-C (to any rank, or to this process) saves a checkpoint on every
rank and exits 0; a second Ctrl-C aborts. If a rank dies, the others are stopped
and the lost rank is named. --resume auto (the default) continues from the newest
complete checkpoint.

example:
  megamem train configs/cpu-smoke.yaml --set data.path=data/stdlib --set train.steps=30 --set run.dir=runs/smoke
  megamem train configs/cpu-smoke.yaml --set data.path=data/stdlib --nproc 2 --set parallel.zero_stage=2"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (in-process, or N local ranks)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--nproc", type=int, default=1, help="local ranks (default 1: in this process)")
    parser.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                        help="auto: newest complete checkpoint of run.dir (default); none: refuse if run.dir has one; "
                             "or a checkpoint dir")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from megamem.errors import MegamemError
    from megamem.training.preflight import check_layout, check_run_dir, open_training_data

    config = config_from_args(args)
    if args.nproc < 1:
        raise MegamemError(f"--nproc must be at least 1, got {args.nproc}")
    check_layout(config, args.nproc)
    check_run_dir(Path(config.run.dir))
    if args.nproc == 1:
        from megamem.training.entry import run_training, single_process_env

        single_process_env()
        run_training(config, args.resume)
        return 0
    open_training_data(config)           # a data problem fails here, not once per launched rank
    return _launch(args, Path(config.run.dir))


def _launch(args: argparse.Namespace, run_dir: Path) -> int:
    from megamem.training.supervisor import LocalRanks, rank_command, rank_environment

    command = rank_command(args.configs, args.overrides, args.resume)
    return LocalRanks(command, args.nproc, rank_environment(args.nproc), run_dir).run()
