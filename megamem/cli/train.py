"""`megamem train`: one process in-process, or N local ranks through the deepspeed launcher."""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from megamem.cli.common import add_config_arguments, config_from_args
from megamem.ports import free_port

HELP = """\
Train a model on megamem preprocess shards. One process runs in this process;
--nproc N starts N ranks on this machine through the deepspeed launcher (gloo on
CPU). Outputs go to run.dir: config.yaml, metrics.jsonl, tensorboard/,
checkpoints/. A SIGTERM (SLURM preemption) saves a checkpoint and exits 0;
--resume auto (the default) continues from the newest complete checkpoint.

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
    from megamem.training.entry import check_layout, open_training_data

    config = config_from_args(args)
    if args.nproc < 1:
        raise MegamemError(f"--nproc must be at least 1, got {args.nproc}")
    check_layout(config, args.nproc)
    if args.nproc == 1:
        from megamem.training.entry import run_training, single_process_env

        single_process_env()
        run_training(config, args.resume)
        return 0
    open_training_data(config)           # a data problem fails here, not once per launched rank
    return _launch(args, config)


def _cmdline_has(process, text: str) -> bool:
    import psutil

    try:
        return text in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _launch(args: argparse.Namespace, config) -> int:
    """The deepspeed launcher with N local ranks; SIGTERM is passed on, and a run it stopped cleanly exits 0."""
    import psutil
    import torch

    from megamem.training import entry
    from megamem.training.checkpoint import complete_checkpoints

    launcher = Path(sys.executable).with_name("deepspeed")
    launcher = str(launcher) if launcher.exists() else shutil.which("deepspeed")
    port = free_port()
    command = [launcher, "--num_gpus", str(args.nproc), "--master_port", str(port), entry.__file__,
               "--config", *args.configs, "--resume", args.resume]
    for override in args.overrides:
        command += ["--set", override]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    before = complete_checkpoints(Path(config.run.dir))
    child = subprocess.Popen(command, env=env)
    stopped = []

    def forward(signum, _frame):
        """To the training ranks themselves: the deepspeed runner dies of SIGTERM without passing it on, and its
        launch.py would SIGKILL ranks still saving after 30 s. Before any rank exists, to the whole tree."""
        stopped.append(signum)
        try:
            tree = psutil.Process(child.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        ranks = [p for p in tree if _cmdline_has(p, entry.__file__)]
        for process in ranks or [*tree, psutil.Process(child.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):     # a rank that has just exited needs no signal
                process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped and complete_checkpoints(Path(config.run.dir)) != before:
        print("megamem train: stopped by SIGTERM after saving a checkpoint; continue with --resume auto",
              file=sys.stderr)
        return 0
    return code
