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

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megamem.checkpoint.catalog import set_aside_newer
from megamem.checkpoint.checks import check_files, check_same_layout, check_same_model
from megamem.checkpoint.format import SHARDED, DataPosition, Marker, read_marker
from megamem.checkpoint.write import CheckpointNotSaved, save_checkpoint
from megamem.data_tools.loader import valid_batches
from megamem.errors import MegamemError
from megamem.parallel.replica_checks import assert_same_batch
from megamem.training.run import Run

SPIKE_HISTORY = (10, 20)        # train.spike_rollback compares a loss with the mean of the last 10 to 20
MAX_ROLLBACKS_TO_ONE_CHECKPOINT = 3


class Trainer:
    """Trains a Run; how a step runs (a pipeline or not) is the engine's business (megamem.training.engine)."""

    def __init__(self, run: Run):
        self.run = run
        self.config, self.state, self.engine, self.loader = run.config, run.state, run.engine, run.loader
        self.logger, self.stats, self.device, self.stop = run.logger, run.stats, run.device, run.stop
        self.step = 0
        self.consecutive_skips = 0
        self.recent_losses: list[float] = []         # for train.spike_rollback
        self.rollbacks = 0
        self.last_checkpoint: Path | None = None      # the same on every rank: what a rollback returns to
        self.rollbacks_to_last = 0
        self._valid_batches: list[torch.Tensor] | None = None     # the same every evaluation: read once
        self._batch_checked = False                 # tensor-parallel ranks hold the same batch: checked once

    def train_step(self, measure_grad_norm: bool) -> dict[str, float]:
        """One optimizer step over the engine's accumulation of micro-batches; returns its scalars."""
        counter = self.state.tensor_parallel.counter
        counter.reset()
        skipped_before = self.engine.skipped_steps
        started = time.perf_counter()
        loss, norm, times = self.engine.train_step(self._next_batch, measure_grad_norm)
        skipped = self.engine.skipped_steps > skipped_before
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        step_ms = (time.perf_counter() - started) * 1e3
        tokens = self.config.train.micro_batch_size * self.engine.accumulation * self.config.model.seq_len
        replica_tokens_per_sec = tokens / (step_ms / 1e3)      # every rank of a replica works on the same tokens
        tflops = replica_tokens_per_sec * self.run.flops_per_token / 1e12 / (self.state.tp * self.state.pp)
        traffic = {} if self.state.tp == 1 else {      # what this rank received from its tensor-parallel group
            "tp_forward_bytes_per_token": counter.total("forward") / tokens,
            "tp_backward_bytes_per_token": counter.total("backward") / tokens}
        return {"loss": loss, "lr": self.engine.lr, **traffic, "skipped": float(skipped),
                "skipped_steps": float(self.engine.skipped_steps),
                "grad_norm": float(norm) if norm is not None else float("nan"),
                "loss_scale": self.engine.loss_scale,
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

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same eval_steps batches every time, averaged over data-parallel ranks."""
        if self._valid_batches is None:
            self._valid_batches = list(valid_batches(self.run.valid_manifests, self.config.train.micro_batch_size,
                                                     self.state.dp_rank, self.state.dp, self.config.train.eval_steps))
        self.engine.eval()
        total = self.engine.validation_sums(self._valid_batches)
        self.engine.train()
        dist.all_reduce(total, group=self.state.group("dp"))
        return (total[0] / total[1]).item()

    def save(self, last: bool) -> None:
        """`last`: the run ends after it (its final step, or a stop), so a failed write ends the run non-zero."""
        marker = Marker(kind=SHARDED, step=self.step, position=DataPosition(**self.loader.state_dict()),
                        model=dataclasses.asdict(self.config.model), layout=self.run.layout, files={},
                        shards=self.run.shards)
        try:
            path = save_checkpoint(self.engine.save_files, Path(self.config.run.dir), marker, self.state.pp_rank,
                                   self.engine.optimizer_order, self.config.checkpoint.keep)
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
        self.step = marker.step
        self.loader.load_state_dict(dataclasses.asdict(marker.position),
                                    marker.layout.dp if marker.universal else None)
        self.logger.rewind(self.step)
        if dist.get_rank() == 0:
            for moved in set_aside_newer(path):
                self.logger.message(f"megamem: {moved.name[len('abandoned-'):]} is newer than the checkpoint resumed "
                                    f"from: moved aside to {moved}")
        dist.barrier()
        self.last_checkpoint, self.rollbacks_to_last = path, 0
        self.logger.message(f"resumed from {path} at step {self.step}")

    def _restore(self, path: Path) -> Marker:
        """Engine state (and RNG) from a checkpoint, after checking its files and model; returns its marker."""
        marker = read_marker(path)
        check_files(path, marker)
        check_same_model(path, marker, dataclasses.asdict(self.config.model))
        if marker.universal:                    # megamem reshard's: any layout
            self.engine.load_universal(path, marker)
            if not marker.has_optimizer:
                self.logger.message(f"{path} was resharded with --weights-only: Adam's moments start from zero")
        else:
            check_same_layout(path, marker, self.run.layout)
            self.engine.load_files(path, marker)
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
        self.engine.set_step(self.step)
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


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
