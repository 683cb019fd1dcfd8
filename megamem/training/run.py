"""What a training run is made of, built in one place: `build_run(config, resume, stop) -> Run`.

Build order: the data and the run directory checked, the process group, the
layout and its groups, the checkpoint to resume from (refused before anything is
written if it cannot be loaded), the loader, the model cut for this rank, the
DeepSpeed engine, monitoring. Every rank runs it, however the ranks were started
(megamem.training.entry).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d

from megamem.checkpoint.catalog import find_resume
from megamem.checkpoint.checks import check_resumable
from megamem.checkpoint.format import Layout, ShardRecord, read_marker
from megamem.config import save_config
from megamem.config.schema import Config
from megamem.data_tools.loader import TrainLoader
from megamem.deepspeed_import import import_deepspeed
from megamem.faults import with_loss_faults
from megamem.flops import flops_report
from megamem.model import build_model
from megamem.parallel.activation_checkpointing import apply_activation_checkpointing
from megamem.parallel.parallelize import parallelize
from megamem.parallel.sharding import shard_records
from megamem.parallel.state import ParallelState
from megamem.stop_signals import StopRequest
from megamem.training.bucket_stats import BucketStats
from megamem.training.engine import Engine, build_engine
from megamem.training.metrics import MetricsLogger
from megamem.training.preflight import check_layout, check_run_dir, open_training_data


@dataclass
class Run:
    config: Config
    state: ParallelState
    layout: Layout                      # what checkpoints record of `state` and the config
    engine: Engine                      # the model (engine.module), its optimizer and its loss
    loader: TrainLoader
    valid_manifests: list
    logger: MetricsLogger
    stats: BucketStats
    shards: dict[str, ShardRecord]      # every tensor-parallel shard of the whole model, by plain name
    flops_per_token: int
    device: torch.device
    stop: StopRequest
    resume_from: Path | None

    @property
    def model(self) -> nn.Module:
        """This rank's part of the model, as DeepSpeed holds it (a pipeline stage's layers under pp > 1)."""
        return self.engine.module

    @property
    def loss_fn(self):
        """lm_loss for a whole head, the vocabulary-parallel cross-entropy for a split one."""
        return self.engine.loss_fn


def build_run(config: Config, resume: str, stop: StopRequest) -> Run:
    spec, manifests = open_training_data(config)
    run_dir = Path(config.run.dir)
    check_run_dir(run_dir)
    device = _init_distributed(config)
    par = config.parallel
    dp = check_layout(config, dist.get_world_size())
    state = ParallelState.for_world(par.tp, par.pp, dist.get_world_size(), dist.get_rank())
    state.build_groups()
    layout = Layout(state.tp, state.pp, state.dp, par.zero_stage,
                    par.table_sharding if config.model.arch == "memoryformer" else None)

    resume_from = find_resume(run_dir, resume)
    if resume_from is not None:
        check_resumable(resume_from, read_marker(resume_from), dataclasses.asdict(config.model), layout)
    if state.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    loader = TrainLoader(manifests, spec.weights, config.train.micro_batch_size, config.run.seed, state.dp_rank, dp,
                         config.data.num_workers)

    torch.manual_seed(config.run.seed)
    model = build_model(config, device="meta")
    loss_fn = with_loss_faults(parallelize(model, config, state))
    shards = shard_records(model)
    if config.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    engine = build_engine(model, config, state, loss_fn, device)
    logger = MetricsLogger(run_dir, state.rank == 0, config.logging.tensorboard, config.train.steps)
    run = Run(config, state, layout, engine, loader, manifests, logger, BucketStats(engine.module, engine.plain_name),
              shards, flops_report(config, config.model.seq_len)["model"]["training_flops_per_token"], device, stop,
              resume_from)
    _announce(run)
    return run


def bound_collectives(seconds: float) -> datetime.timedelta:
    """Make train.collective_timeout_s the timeout of every process group, the ones DeepSpeed creates included
    (torch gives a group created without one its backend's default, 30 minutes for gloo)."""
    timeout = datetime.timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def unlink_shared_memory_buffers(rank: int) -> None:
    """Let DeepSpeed's CPU all-reduce buffers go when the run ends, however it ends.

    On one CPU node DeepSpeed gives each rank a 66 MB file in /dev/shm that every
    other rank maps while init_distributed runs, and never removes it: each run
    (a killed one too) would leave its files in memory until reboot. Once every
    rank has mapped them (the barrier), removing the names frees the memory when
    the last process exits.
    """
    dist.barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{address}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def _init_distributed(config: Config) -> torch.device:
    """The process group (NCCL on GPUs, gloo on CPUs) with the run's collective timeout; this rank's device."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    import_deepspeed().init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                        timeout=bound_collectives(config.train.collective_timeout_s))
    if not cuda:
        unlink_shared_memory_buffers(dist.get_rank())
    return device


def _announce(run: Run) -> None:
    """The run's layout, and a warning when a tensor-parallel group spans nodes."""
    config, par, world = run.config, run.config.parallel, run.state.world_size
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if par.tp > 1 and local % par.tp:
        run.logger.message(f"megamem: warning: parallel.tp={par.tp} does not divide the {local} ranks per node, so "
                           f"tensor-parallel groups span nodes and every block's all-gathers cross the network; use "
                           f"a tp that divides the GPUs per node")
    layout = ", ".join([*([f"tp={par.tp} ({par.table_sharding} tables)"] if par.tp > 1 else []),
                        *([f"pp={par.pp}"] if par.pp > 1 else []), f"dp={run.state.dp}"])
    run.logger.message(f"megamem: training {config.model.arch} on {world} rank(s) ({layout}, ZeRO {par.zero_stage}, "
                       f"{config.train.precision}) into {config.run.dir}; watch with: "
                       f"tensorboard --logdir {Path(config.run.dir) / 'tensorboard'}")
