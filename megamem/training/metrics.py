"""One metrics sink for a run: metrics.jsonl, TensorBoard and a console line, on one rank.

Keys are fixed so dashboards and scripts keep working across versions:
scalars land in metrics.jsonl under their plain names (step, loss, lr, ...) and
in TensorBoard under `group/name` tags (train/loss, perf/tokens_per_sec, ...).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "loss_scale": "train/loss_scale",
    "tokens_per_sec": "perf/tokens_per_sec", "samples_per_sec": "perf/samples_per_sec",
    "tflops_per_gpu": "perf/tflops_per_gpu", "mfu": "perf/mfu",
    "data_ms": "time/data_ms", "forward_ms": "time/forward_ms", "backward_ms": "time/backward_ms",
    "optimizer_ms": "time/optimizer_ms", "step_ms": "time/step_ms",
    "memory_gb": "memory/max_allocated_gb" if torch.cuda.is_available() else "memory/rss_gb",
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
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

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
