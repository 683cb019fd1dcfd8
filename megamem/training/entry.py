"""What every training rank runs, however it was started.

`megamem train` runs it in-process (one rank) or as N ranks it starts and watches
(`--nproc N`, megamem.training.supervisor); clusters start it with `deepspeed launchers/pretrain.py` or
`torchrun launchers/pretrain.py`. Build order: distributed init, layout checks,
model, data, optimizer and DeepSpeed engine, monitoring, resume, loop.

A rank that loses its peers over gloo (one died, or stalled past
train.collective_timeout_s) says so in one line and exits 3 at once: its
collectives cannot complete, and the launcher (megamem train's supervisor,
srun --kill-on-bad-exit, DeepSpeed's launcher) ends the rest of the job. Over
NCCL, its watchdog aborts the rank after the same timeout.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

import torch


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


def bound_collectives(seconds: float) -> datetime.timedelta:
    """Make train.collective_timeout_s the timeout of every process group, the ones DeepSpeed creates included
    (torch gives a group created without one its backend's default, 30 minutes for gloo)."""
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def lost_peers(err: BaseException) -> bool:
    """A collective that failed because another rank died or stalled: gloo and NCCL say so in their own words."""
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo/transport" in str(err))


def _first_words(err: BaseException) -> str:
    """gloo's message without its source location and advice: `Read error [10.0.0.7]:41234: Connection reset`."""
    text = re.sub(r"^\[[^\]]*\] ", "", str(err).strip().splitlines()[0])
    return text.split(". This is typically")[0]


def unlink_shared_memory_buffers(rank: int) -> None:
    """Let DeepSpeed's CPU all-reduce buffers go when the run ends, however it ends.

    On one CPU node DeepSpeed gives each rank a 66 MB file in /dev/shm that every
    other rank maps while init_distributed runs, and never removes it: each run
    (a killed one too) would leave its files in memory until reboot. Once every
    rank has mapped them (the barrier), removing the names frees the memory when
    the last process exits.
    """
    import torch.distributed as dist

    dist.barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{address}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def run_training(config, resume: str) -> None:
    from megamem.stop_signals import StopRequest

    stop = StopRequest().install()              # from here on a stop signal ends the run with a checkpoint
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    from megamem.config import save_config
    from megamem.data_tools.loader import TrainLoader
    from megamem.errors import MegamemError
    from megamem.faults import with_loss_faults
    from megamem.flops import flops_report
    from megamem.model import build_model
    from megamem.model.init import materialize
    from megamem.parallel.activation_checkpointing import apply_activation_checkpointing
    from megamem.parallel.deepspeed_mpu import DeepSpeedMPU
    from megamem.parallel.grad_norm import clip_across_stages
    from megamem.parallel.marks import partitions
    from megamem.parallel.parallelize import parallelize
    from megamem.parallel.pipeline import pipeline_module
    from megamem.parallel.state import ParallelState
    from megamem.training.bucket_stats import BucketStats
    from megamem.training.checkpoint import find_resume
    from megamem.training.deepspeed_config import deepspeed_config
    from megamem.training.metrics import MetricsLogger
    from megamem.training.optimizer import build_optimizer, build_scheduler
    from megamem.training.preflight import check_layout, check_run_dir, open_training_data
    from megamem.training.trainer import Trainer, check_resumable

    spec, manifests = open_training_data(config)
    run_dir = Path(config.run.dir)
    check_run_dir(run_dir)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               timeout=bound_collectives(config.train.collective_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda:
        unlink_shared_memory_buffers(rank)
    par = config.parallel
    dp = check_layout(config, world)
    state = ParallelState.for_world(par.tp, par.pp, world, rank)
    state.build_groups()

    resume_from = find_resume(run_dir, resume)
    if resume_from is not None:
        check_resumable(resume_from, config, state)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    loader = TrainLoader(manifests, spec.weights, config.train.micro_batch_size, config.run.seed, state.dp_rank, dp,
                         config.data.num_workers)

    torch.manual_seed(config.run.seed)
    model = build_model(config, device="meta")
    loss_fn = with_loss_faults(parallelize(model, config, state))
    sharded = partitions(model)
    if config.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if state.pp > 1:
        model = pipeline_module(model, config, state, loss_fn, device)
        mpu = None                                  # the pipeline engine uses the module's grid (asserted to match)
    else:
        materialize(model, device, config.run.seed)
        mpu = DeepSpeedMPU(state)
    steps_itself = par.zero_stage == 0 and config.train.precision == "fp32"
    optimizer = build_optimizer(model, config.optimizer, steps_itself)
    scheduler = build_scheduler(optimizer, config.train.steps, config.schedule, config.optimizer.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, dp), mpu=mpu)
    if state.pp > 1:
        clip_across_stages(engine, state)
    flops_per_token = flops_report(config, config.model.seq_len)["model"]["training_flops_per_token"]
    logger = MetricsLogger(run_dir, rank == 0, config.logging.tensorboard, config.train.steps)
    stats = BucketStats(engine.module, model.plain_name if state.pp > 1 else None)
    trainer = Trainer(config, state, engine, loss_fn, loader, manifests, logger, stats, flops_per_token, device,
                      sharded, stop)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if par.tp > 1 and local % par.tp:
        logger.message(f"megamem: warning: parallel.tp={par.tp} does not divide the {local} ranks per node, so "
                       f"tensor-parallel groups span nodes and every block's all-gathers cross the network; use a "
                       f"tp that divides the GPUs per node")
    layout = ", ".join([*([f"tp={par.tp} ({par.table_sharding} tables)"] if par.tp > 1 else []),
                        *([f"pp={par.pp}"] if par.pp > 1 else []), f"dp={dp}"])
    logger.message(f"megamem: training {config.model.arch} on {world} rank(s) ({layout}, ZeRO {par.zero_stage}, "
                   f"{config.train.precision}) into {run_dir}; watch with: "
                   f"tensorboard --logdir {run_dir / 'tensorboard'}")
    try:
        if resume_from is not None:
            trainer.load(resume_from)
        trainer.fit()
    except MegamemError:                # every rank is well: leave the process group before the interpreter does,
        dist.destroy_process_group()    # which can abort on its threads ("terminate called without ...")
        raise
    finally:
        loader.close()
        logger.close()
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
