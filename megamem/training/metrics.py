"""One metrics sink for a run: metrics.jsonl, TensorBoard and a console line, on one rank.

Keys are fixed so dashboards and scripts keep working across versions:
scalars land in metrics.jsonl under their plain names (step, loss, lr, ...) and
in TensorBoard under `group/name` tags (train/loss, perf/tokens_per_sec, ...).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from megamem.durable import atomic_write

TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "loss_scale": "train/loss_scale",
    "tokens_per_sec": "perf/tokens_per_sec", "samples_per_sec": "perf/samples_per_sec",
    "tflops_per_gpu": "perf/tflops_per_gpu", "mfu": "perf/mfu",
    "data_ms": "time/data_ms", "forward_ms": "time/forward_ms", "backward_ms": "time/backward_ms",
    "optimizer_ms": "time/optimizer_ms", "step_ms": "time/step_ms",
    "memory_gb": "memory/max_allocated_gb" if torch.cuda.is_available() else "memory/rss_gb",
    "skipped": "train/skipped", "skipped_steps": "train/skipped_steps",
    "valid_loss": "valid/loss", "valid_perplexity": "valid/perplexity",
    "tp_forward_bytes_per_token": "comm/tp_forward_bytes_per_token",
    "tp_backward_bytes_per_token": "comm/tp_backward_bytes_per_token",
}


class MetricsLogger:
    """Writes only where `enabled` (the designated rank); every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, total_steps: int):
        self.enabled, self.total_steps = enabled, total_steps
        self.started = time.monotonic()
        self.writer = None
        if not enabled:
            return
        self.path, self.tensorboard_dir = run_dir / "metrics.jsonl", run_dir / "tensorboard"
        self.jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard_dir))

    def rewind(self, step: int) -> None:
        """A resumed run logs the steps after its checkpoint again: drop what the stopped or crashed run logged
        past `step` (and a line a crash cut short), so that metrics.jsonl and TensorBoard hold each step once."""
        if not self.enabled:
            return
        self.jsonl.close()
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        atomic_write(self.path, "".join(line + "\n" for line in kept).encode())
        self.jsonl = open(self.path, "a", buffering=1)
        if self.writer:
            from torch.utils.tensorboard import SummaryWriter

            self.writer.close()
            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=step + 1)

    def log(self, step: int, scalars: dict[str, float], buckets: dict[str, dict[str, float]] | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **scalars}
        if buckets:
            record["buckets"] = buckets
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(TAGS.get(key, f"train/{key}"), value, step)
            for layer, values in (buckets or {}).items():
                for name, value in values.items():
                    self.writer.add_scalar(f"buckets/{layer}/{name}", value, step)
            self.writer.flush()

    def histograms(self, step: int, counts: dict[str, torch.Tensor]) -> None:
        """Bucket frequencies as TensorBoard histograms: bucket index on the x axis, hits as the height."""
        if not (self.enabled and self.writer):
            return
        for name, hits in counts.items():
            hits = hits.double()
            index = torch.arange(len(hits), dtype=torch.float64)
            total = float(hits.sum())
            self.writer.add_histogram_raw(
                f"buckets/{name}", min=0.0, max=float(len(hits) - 1), num=total, sum=float((index * hits).sum()),
                sum_squares=float((index * index * hits).sum()), bucket_limits=(index + 0.5).tolist(),
                bucket_counts=hits.tolist(), global_step=step)
        self.writer.flush()

    def console(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(step, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("valid_loss", "valid {:.4f}"), ("lr", "lr {:.2e}"),
                         ("grad_norm", "grad {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
                         ("tflops_per_gpu", "{:.3f} TFLOP/s")):
            if key in scalars:
                parts.append(fmt.format(scalars[key]))
        parts.append(f"ETA {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer:
                self.writer.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
