"""What every training rank runs, however it was started.

`megamem train` runs it in-process (one rank) or as N ranks it starts and watches
(`--nproc N`, megamem.training.supervisor); clusters start it with `deepspeed launchers/pretrain.py` or
`torchrun launchers/pretrain.py`. What a run is made of is built by
megamem.training.run.build_run; this module starts it and says how it ended.

A rank that loses its peers over gloo (one died, or stalled past
train.collective_timeout_s) says so in one line and exits 3 at once: its
collectives cannot complete, and the launcher (megamem train's supervisor,
srun --kill-on-bad-exit, DeepSpeed's launcher) ends the rest of the job. Over
NCCL, its watchdog aborts the rank after the same timeout.
"""
from __future__ import annotations

import argparse
import os
import re
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one megamem training rank")
    parser.add_argument("--config", nargs="+", required=True, help="YAML files, merged in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", default="auto",
                        help="auto (newest complete checkpoint), none, or a checkpoint directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def single_process_env() -> None:
    """Let one process without a launcher form a world of one."""
    if "RANK" in os.environ:
        return
    from megamem.ports import free_port

    port = free_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def lost_peers(err: BaseException) -> bool:
    """A collective that failed because another rank died or stalled: gloo and NCCL say so in their own words."""
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo/transport" in str(err))


def _first_words(err: BaseException) -> str:
    """gloo's message without its source location and advice: `Read error [10.0.0.7]:41234: Connection reset`."""
    text = re.sub(r"^\[[^\]]*\] ", "", str(err).strip().splitlines()[0])
    return text.split(". This is typically")[0]


def run_training(config, resume: str) -> None:
    """Build the run and train it. The stop signal is caught before the seconds of importing torch and DeepSpeed,
    so a preemption that early still ends in an orderly exit."""
    from megamem.stop_signals import StopRequest

    stop = StopRequest().install()              # from here on a stop signal ends the run with a checkpoint
    import torch.distributed as dist

    from megamem.errors import MegamemError
    from megamem.training.run import build_run
    from megamem.training.trainer import Trainer

    run = build_run(config, resume, stop)
    trainer = Trainer(run)
    try:
        if run.resume_from is not None:
            trainer.load(run.resume_from)
        trainer.fit()
    except MegamemError:                # every rank is well: leave the process group before the interpreter does,
        dist.destroy_process_group()    # which can abort on its threads ("terminate called without ...")
        raise
    finally:
        run.loader.close()
        run.logger.close()
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from megamem.config import load_config
    from megamem.errors import MegamemError
    from megamem.training.huge_pages import prefer_huge_pages

    prefer_huge_pages()
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        config = load_config(args.config, args.overrides)
        single_process_env()
        run_training(config, args.resume)
    except MegamemError as err:
        if os.environ.get("MEGAMEM_DEBUG"):
            raise
        print(f"megamem train: error: rank {rank}: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:
        if not lost_peers(err) or os.environ.get("MEGAMEM_DEBUG"):
            raise
        from megamem.training.supervisor import LOST_PEERS_EXIT

        print(f"megamem train: error: rank {rank} lost contact with the other ranks ({_first_words(err)}): "
              f"one died, or stalled for longer than train.collective_timeout_s. This rank stops; relaunch with "
              f"--resume auto once the cause is fixed", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(LOST_PEERS_EXIT)   # a normal exit would wait on, or abort in, the failed communicator's threads
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is saved and the process group left; skip the interpreter's teardown, where a communication
    # library's static threads can still abort a finished rank ("terminate called without an active exception").
    os._exit(status)
