"""The training loop, as named steps: train_step, evaluate, save, load, fit.

The trainer owns the step counter and the data position; both go into every
checkpoint, so a resumed run continues with exactly the batches and learning
rates an uninterrupted run would have seen. Stopping is agreed by all ranks
each step (a one-element all-reduce), so a stop signal on any rank, e.g. SLURM
preempting the job, leads every rank to the same final checkpoint. A step
whose gradients are not finite is skipped by the optimizer (and counted); a
run of them stops training, which has diverged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megamem.config.schema import Config
from megamem.data_tools.loader import TrainLoader, valid_batches
from megamem.errors import MegamemError
from megamem.parallel.grad_norm import grad_norm
from megamem.parallel.replica_checks import assert_same_batch
from megamem.parallel.state import ParallelState
from megamem.stop_signals import StopRequest
from megamem.training.bucket_stats import BucketStats
from megamem.training.checkpoint import (
    MARKER,
    CheckpointNotSaved,
    check_files,
    check_same_layout,
    check_same_model,
    load_checkpoint,
    save_checkpoint,
    set_aside_newer,
)
from megamem.training.metrics import MetricsLogger
from megamem.training.optimizer import schedule_at
from megamem.training.reshard import is_universal, load_universal

SPIKE_HISTORY = (10, 20)        # train.spike_rollback compares a loss with the mean of the last 10 to 20
MAX_ROLLBACKS_TO_ONE_CHECKPOINT = 3


class Trainer:
    """`loss_fn(logits, targets)` is handed in: lm_loss for a whole head, megamem.parallel's
    vocabulary-parallel cross-entropy for a split one; the trainer never looks inside the logits.
    `sharded` is what checkpoints record of the tensor-parallel shards (megamem.parallel.marks.partitions of
    the whole model: a pipeline stage holds only some of them)."""

    def __init__(self, config: Config, state: ParallelState, engine, loss_fn, loader: TrainLoader,
                 valid_manifests: list,
                 logger: MetricsLogger, stats: BucketStats, flops_per_token: int, device: torch.device,
                 sharded: dict[str, list[int]], stop: StopRequest):
        self.stop = stop
        self.sharded = sharded                      # {plain name: [dim, stride]} of every tensor-parallel shard
        self.config, self.state, self.engine, self.loss_fn, self.loader = config, state, engine, loss_fn, loader
        self.valid_manifests, self.logger, self.stats = valid_manifests, logger, stats
        self.flops_per_token, self.device = flops_per_token, device
        self.step = 0
        self.consecutive_skips = 0
        self.recent_losses: list[float] = []         # for train.spike_rollback
        self.rollbacks = 0
        self.last_checkpoint: Path | None = None      # the same on every rank: what a rollback returns to
        self.rollbacks_to_last = 0
        self._valid_batches: list[torch.Tensor] | None = None     # the same every evaluation: read once
        self.accumulation = engine.gradient_accumulation_steps()
        self._batch_checked = False                 # tensor-parallel ranks hold the same batch: checked once
        self.pipelined = state.pp > 1
        # DeepSpeed reports the norm it clipped by except where it steps torch's optimizer itself (fp32 without
        # ZeRO): there every rank keeps whole, averaged gradients, and megamem measures them before the step
        self.measures_grad_norm = config.parallel.zero_stage == 0 and config.train.precision == "fp32"
        # there, with one replica, DeepSpeed's gradient all-reduce averages over a group of one, after copying every
        # gradient into flat buffers and back (a tenth of a CPU step): its no_sync leaves the gradients where they are
        self._reduction = engine.no_sync if self.measures_grad_norm and state.dp == 1 and not self.pipelined \
            else contextlib.nullcontext
        self._pipeline_batches = self._pipeline_inputs()

    def train_step(self, measure_grad_norm: bool) -> dict[str, float]:
        """One optimizer step over `accumulation` micro-batches; returns its scalars."""
        # a pipeline interleaves micro-batches' forwards and backwards across stages: only the whole step is timed
        times = {} if self.pipelined else dict.fromkeys(("data_ms", "forward_ms", "backward_ms", "optimizer_ms"), 0.0)
        counter = self.state.tensor_parallel.counter
        counter.reset()
        skipped_before = self.engine.skipped_steps
        started = time.perf_counter()
        loss, norm = self._run_step(times, measure_grad_norm)
        skipped = self.engine.skipped_steps > skipped_before
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        step_ms = (time.perf_counter() - started) * 1e3
        tokens = self.config.train.micro_batch_size * self.accumulation * self.config.model.seq_len
        replica_tokens_per_sec = tokens / (step_ms / 1e3)      # every rank of a replica works on the same tokens
        tflops = replica_tokens_per_sec * self.flops_per_token / 1e12 / (self.state.tp * self.state.pp)
        traffic = {} if self.state.tp == 1 else {      # what this rank received from its tensor-parallel group
            "tp_forward_bytes_per_token": counter.total("forward") / tokens,
            "tp_backward_bytes_per_token": counter.total("backward") / tokens}
        return {"loss": loss, "lr": self.engine.get_lr()[0], **traffic, "skipped": float(skipped),
                "skipped_steps": float(self.engine.skipped_steps),
                "grad_norm": float(norm) if norm is not None else float("nan"),
                "loss_scale": loss_scale(self.engine.optimizer),
                "tokens_per_sec": replica_tokens_per_sec * self.state.dp,
                "samples_per_sec": replica_tokens_per_sec * self.state.dp / self.config.model.seq_len,
                "tflops_per_gpu": tflops, "mfu": tflops / self.config.logging.peak_tflops,
                "step_ms": step_ms, **times, "memory_gb": _memory_gb()}

    def _next_batch(self) -> torch.Tensor:
        batch = next(self.loader).to(self.device, non_blocking=True)
        if not self._batch_checked:
            assert_same_batch(batch, self.state)
            self._batch_checked = True
        return batch

    def _pipeline_inputs(self):
        """(inputs, targets) as DeepSpeed's pipeline reads them: the first stage takes inputs, the last targets,
        the stages between read nothing."""
        while True:
            batch = self._next_batch()
            yield batch[:, :-1], batch[:, 1:]

    def _run_step(self, times: dict[str, float], measure_grad_norm: bool) -> tuple[torch.Tensor, float | None]:
        """How a step runs: the one place that talks to the engine's forward, backward and step.

        Returns the step's mean loss and the gradient norm of the whole model (None
        where the engine does not report one). A pipeline runs the whole step in
        train_batch, whose loss is the last stage's, averaged over the micro-batches
        and data-parallel replicas and broadcast to every stage.
        """
        if self.pipelined:
            loss = self.engine.train_batch(self._pipeline_batches)
            return loss.detach().float(), self.engine.get_global_grad_norm()
        losses = []
        norm = None
        for micro in range(self.accumulation):
            mark = time.perf_counter()
            batch = self._next_batch()
            times["data_ms"] += self._lap(mark)
            mark = time.perf_counter()
            loss = self.loss_fn(self.engine(batch[:, :-1]), batch[:, 1:])
            times["forward_ms"] += self._lap(mark)
            mark = time.perf_counter()
            with self._reduction():
                self.engine.backward(loss)
            times["backward_ms"] += self._lap(mark)
            if measure_grad_norm and micro == self.accumulation - 1 and self.measures_grad_norm:
                norm = grad_norm(self.engine.module, self.state)
            mark = time.perf_counter()
            self.engine.step()
            times["optimizer_ms"] += self._lap(mark)
            losses.append(loss.detach())
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return torch.stack(losses).float().mean(), norm

    def _lap(self, mark: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - mark) * 1e3

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same eval_steps batches every time, averaged over data-parallel ranks."""
        if self._valid_batches is None:
            self._valid_batches = list(valid_batches(self.valid_manifests, self.config.train.micro_batch_size,
                                                     self.state.dp_rank, self.state.dp, self.config.train.eval_steps))
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.pipelined:
            # the last stage's mean over the batches, averaged over replicas by DeepSpeed and broadcast to every
            # stage; so that it is the mean over batches, every replica evaluates as many (the smallest share)
            share = torch.tensor([len(self._valid_batches)], device=self.device)
            dist.all_reduce(share, op=dist.ReduceOp.MIN, group=self.state.group("dp"))
            count = int(share.item())
            if count == 0:
                raise MegamemError(f"train.eval_steps={self.config.train.eval_steps} validation batches leave some "
                                   f"of the {self.state.dp} data-parallel replicas none. Fix: set train.eval_steps "
                                   f"to at least {self.state.dp}")
            batches = ((batch[:, :-1], batch[:, 1:]) for batch in self._valid_batches[:count])
            mean = self.engine.eval_batch(batches, num_micro_batches=count)
            total += torch.tensor([mean.item() * count, float(count)], dtype=torch.float64, device=self.device)
        else:
            for batch in self._valid_batches:
                batch = batch.to(self.device)
                total += torch.stack([self.loss_fn(self.engine(batch[:, :-1]), batch[:, 1:]).double(),
                                      torch.ones((), dtype=torch.float64, device=self.device)])
        self.engine.train()
        dist.all_reduce(total, group=self.state.group("dp"))
        return (total[0] / total[1]).item()

    def layout(self) -> dict:
        return run_layout(self.config, self.state)

    def save(self, last: bool) -> None:
        """`last`: the run ends after it (its final step, or a stop), so a failed write ends the run non-zero."""
        extra = {"loader": self.loader.state_dict(), "layout": self.layout(), "partitions": self.sharded,
                 "model": dataclasses.asdict(self.config.model)}
        try:
            path = save_checkpoint(self.engine, Path(self.config.run.dir), self.step, extra,
                                   self.config.checkpoint.keep)
        except CheckpointNotSaved as err:
            if last or self.config.checkpoint.on_write_error == "stop":
                raise
            self.logger.message(f"megamem: warning: {err}. Training continues and tries again at step "
                                f"{self.step + self.config.checkpoint.interval} (checkpoint.on_write_error=continue)")
            return
        self.last_checkpoint, self.rollbacks_to_last = path, 0
        self.logger.message(f"saved checkpoint {path}")

    def load(self, path: Path) -> None:
        """Resume: the checkpoint's model, optimizer, RNG, step and data position."""
        marker = self._restore(path)
        saved_dp = (marker["source"]["layout"] or {}).get("dp") if is_universal(marker) else None
        self.step = marker["step"]
        self.loader.load_state_dict(marker["loader"], saved_dp)
        self.logger.rewind(self.step)
        if dist.get_rank() == 0:
            for moved in set_aside_newer(path):
                self.logger.message(f"megamem: {moved.name[len('abandoned-'):]} is newer than the checkpoint resumed "
                                    f"from: moved aside to {moved}")
        dist.barrier()
        self.last_checkpoint, self.rollbacks_to_last = path, 0
        self.logger.message(f"resumed from {path} at step {self.step}")

    def _restore(self, path: Path) -> dict:
        """Engine state (and RNG) from a checkpoint, after checking its files and model; returns its marker."""
        marker = json.loads((path / MARKER).read_text())
        check_files(path, marker)
        check_same_model(path, marker, dataclasses.asdict(self.config.model))
        if not is_universal(marker):
            load_checkpoint(self.engine, path, marker, self.layout())
            return marker
        rename = self.engine.module.plain_name if self.pipelined else str     # megamem reshard's: any layout
        load_universal(self.engine, path, marker, rename, self.state.dp)
        if not marker["optimizer"]:
            self.logger.message(f"{path} was resharded with --weights-only: Adam's moments start from zero")
        return marker

    def _spiked(self, loss: float) -> bool:
        """Whether this step's loss (the same on every rank) is a spike against the recent ones."""
        recent = self.recent_losses
        spike = len(recent) >= SPIKE_HISTORY[0] and loss > self.config.train.spike_rollback * sum(recent) / len(recent)
        if not spike and math.isfinite(loss):
            recent.append(loss)
            del recent[:-SPIKE_HISTORY[1]]
        return spike

    def _roll_back(self, loss: float) -> None:
        """Back to the newest checkpoint's weights and optimizer state, keeping the step count, the LR schedule and
        the data position: the batches since that checkpoint are not trained on again."""
        mean = sum(self.recent_losses) / len(self.recent_losses)
        where = f"loss spike at step {self.step} ({loss:.4f} > train.spike_rollback=" \
                f"{self.config.train.spike_rollback:g} x recent mean {mean:.4f})"
        if self.last_checkpoint is None:
            self.logger.message(f"megamem: warning: {where}, but no checkpoint to roll back to yet; training goes on")
            return
        if self.rollbacks_to_last == MAX_ROLLBACKS_TO_ONE_CHECKPOINT:
            raise MegamemError(f"{where}: the loss spiked {MAX_ROLLBACKS_TO_ONE_CHECKPOINT + 1} times since "
                               f"{self.last_checkpoint.name}, so its level has shifted rather than spiked (a change "
                               f"of data?). Fix: resume with a larger train.spike_rollback, or 0 to turn it off")
        self._restore(self.last_checkpoint)
        schedule_at(self.engine.lr_scheduler, self.engine.optimizer.param_groups, self.step)
        self.engine.global_steps = self.step
        self.rollbacks += 1
        self.rollbacks_to_last += 1
        self.logger.message(f"megamem: {where}: rolled back to {self.last_checkpoint.name}, skipping the batches "
                            f"since then (rollback {self.rollbacks})")

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self) -> None:
        cfg = self.config
        total = cfg.train.steps
        if self.step == 0:                     # the baseline every later validation loss is read against
            valid = self.evaluate()
            self.logger.log(0, {"valid_loss": valid, "valid_perplexity": math.exp(min(valid, 50.0))})
            self.logger.console(0, {"valid_loss": valid})
        while self.step < total:
            log_now = (self.step + 1) % cfg.logging.interval == 0 or self.step + 1 == total
            scalars = self.train_step(measure_grad_norm=log_now)
            self.step += 1
            if self.consecutive_skips >= cfg.train.max_consecutive_skips:
                raise MegamemError(f"training diverged: the last {self.consecutive_skips} steps (to step {self.step}) "
                                   f"all had non-finite gradients and were skipped (loss {float(scalars['loss']):g}). "
                                   f"Fix: resume from an earlier checkpoint (--resume RUN/checkpoints/step-N) with a "
                                   f"lower optimizer.lr or a longer schedule.warmup_fraction, or check the data "
                                   f"after that step")
            log_now = log_now or bool(scalars["skipped"])
            spikes = cfg.train.spike_rollback > 0
            if log_now or spikes:
                loss = scalars["loss"].to(self.device)
                dist.all_reduce(loss, group=self.state.group("dp"))
                scalars["loss"] = loss.item() / self.state.dp
            if spikes and not scalars["skipped"] and self._spiked(scalars["loss"]):
                self._roll_back(scalars["loss"])
                log_now = True
            if spikes:
                scalars["rollbacks"] = float(self.rollbacks)
            if log_now:
                if self.step % cfg.train.eval_interval == 0 or self.step == total:
                    scalars["valid_loss"] = self.evaluate()
                    scalars["valid_perplexity"] = math.exp(min(scalars["valid_loss"], 50.0))
                self.stats.reduce([self.state.group("tp"), self.state.group("dp")])
                pipeline = self.state.group("pp")
                self.logger.log(self.step, scalars, self.stats.across_stages(self.stats.summary(), pipeline))
                self.logger.console(self.step, scalars)
                if self.step % cfg.logging.histogram_interval < cfg.logging.interval:
                    self.logger.histograms(self.step, self.stats.across_stages(self.stats.histograms(), pipeline))
                self.stats.reset()
            stop = self._agree_to_stop()
            if self.step % cfg.checkpoint.interval == 0 or self.step == total or stop:
                self.save(last=self.step == total or stop)
            if stop:
                asked = self.stop.signal_name or "a signal to another rank"
                self.logger.message(f"stopping at step {self.step} on request ({asked}); resume with --resume auto")
                return


def loss_scale(optimizer) -> float:
    """The factor DeepSpeed's fp16 optimizers scale the loss and gradients by (its `loss_scale`, dynamic), or 1."""
    return float(getattr(optimizer, "loss_scale", None) or 1.0)


def run_layout(config: Config, state: ParallelState) -> dict:
    """What a checkpoint records of the run's layout (megamem export joins its shards by it)."""
    par, memoryformer = config.parallel, config.model.arch == "memoryformer"
    return {"tp": state.tp, "pp": state.pp, "dp": state.dp, "zero_stage": par.zero_stage,
            "table_sharding": par.table_sharding if memoryformer else None}


def check_resumable(path: Path, config: Config, state: ParallelState) -> None:
    """Refuse a checkpoint of another model, or of another layout unless megamem reshard wrote it, before the run
    writes anything into its directory (its config.yaml stays the one that wrote the checkpoint)."""
    marker = json.loads((path / MARKER).read_text())
    check_same_model(path, marker, dataclasses.asdict(config.model))
    if not is_universal(marker):
        check_same_layout(path, marker, run_layout(config, state))


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
