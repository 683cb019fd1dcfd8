"""Preprocessing and loading throughput on a real corpus of at least 100 MB.

The corpus is the Python standard library's own sources (every machine has them),
written as jsonl, one document per file, and repeated until it reaches --corpus-mb.
Measured: tokens per second per worker and peak RSS for the byte-level tokenizer
(1 and 2 workers) and a 32k byte-level BPE trained here; the loader's samples per
second at cpu-smoke's shape against the samples per second cpu-smoke training
actually consumes on this machine (target: at least 50x).

    python benchmarks/preprocess_throughput.py [--corpus-mb 100] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from megamem.config import load_config
from megamem.data_tools.loader import TrainLoader
from megamem.data_tools.preprocess import PreprocessArgs, preprocess
from megamem.data_tools.shards import load_manifest
from megamem.data_tools.tokenizer import train_bpe
from megamem.model import build_model, lm_loss

REPO = Path(__file__).resolve().parents[1]


def build_corpus(directory: Path, megabytes: float) -> Path:
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    path = directory / "stdlib.jsonl"
    written = 0
    with open(path, "w") as handle:
        while written < megabytes * 1e6:
            for source in sources:
                line = json.dumps({"text": source.read_text(errors="replace")}) + "\n"
                handle.write(line)
                written += len(line)
    return path


def run_preprocess(corpus: Path, out: Path, tokenizer: str, workers: int, seq_len: int) -> dict:
    summary = preprocess(PreprocessArgs([str(corpus)], str(out), seq_len=seq_len, tokenizer=tokenizer, workers=workers,
                                        shard_size_mb=16))
    return {"tokens": summary.tokens, "seconds": round(summary.seconds, 2),
            "tokens_per_sec": round(summary.tokens / summary.seconds),
            "tokens_per_sec_per_worker": round(summary.tokens / summary.seconds / workers),
            "mb_per_sec": round(summary.counts.input_bytes / 1e6 / summary.seconds, 2),
            "peak_rss_mb": round(summary.peak_rss_mb), "worker_peak_rss_mb": round(summary.workers_peak_rss_mb)}


def loader_rate(dataset: Path, batch: int, workers: int, shards: int = 4) -> float:
    """Samples per second over `shards` shards' worth of batches, shard reading and checking included."""
    manifest = load_manifest(dataset)
    batches = shards * manifest.shards[0].samples // batch
    loader = TrainLoader([manifest], [1.0], batch, 0, 0, 1, workers)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch / (time.perf_counter() - start)


def training_rate(steps: int = 20) -> float:
    """Samples per second that cpu-smoke training consumes here (forward, backward, Adam)."""
    config = load_config([REPO / "configs/cpu-smoke.yaml"])
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr)
    batch = torch.randint(0, config.model.vocab_size, (config.train.micro_batch_size, config.model.seq_len + 1))

    def step():
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * config.train.micro_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=100.0)
    parser.add_argument("--bpe-train-mb", type=float, default=20.0, help="text used to train the 32k BPE")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    seq_len = load_config([REPO / "configs/cpu-smoke.yaml"]).model.seq_len

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = build_corpus(tmp, args.corpus_mb)
        rows = []
        for workers in (1, 2):
            rows.append({"tokenizer": "byte", "workers": workers,
                         **run_preprocess(corpus, tmp / f"byte-{workers}", "byte", workers, seq_len)})
        texts, size = [], 0
        with open(corpus) as handle:
            for line in handle:
                texts.append(json.loads(line)["text"])
                size += len(line)
                if size > args.bpe_train_mb * 1e6:
                    break
        started = time.perf_counter()
        bpe = train_bpe(iter(texts), 32000, tmp / "bpe32k.json")
        bpe_seconds = time.perf_counter() - started
        rows.append({"tokenizer": "bpe-32k", "workers": 2,
                     **run_preprocess(corpus, tmp / "bpe", str(bpe.path), 2, seq_len)})

        batch = load_config([REPO / "configs/cpu-smoke.yaml"]).train.micro_batch_size
        consumed = training_rate()
        loader = {f"workers_{w}": round(loader_rate(tmp / "byte-1", batch, w)) for w in (0, 2)}
        best = max(loader.values())
        result = {"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "preprocess": rows,
                  "bpe_train_seconds": round(bpe_seconds, 1), "bpe_vocab_size": bpe.vocab_size,
                  "loader_samples_per_sec": loader, "cpu_smoke_training_samples_per_sec": round(consumed, 1),
                  "loader_over_training": round(best / consumed, 1), "target_loader_over_training": 50}

    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ncorpus: {result['corpus_mb']} MB of Python standard-library sources (jsonl)")
    print(f"{'tokenizer':<10}{'workers':>8}{'tokens':>14}{'seconds':>9}{'tok/s/worker':>14}{'MB/s':>8}{'RSS MB':>8}"
          f"{'worker RSS':>11}")
    for row in rows:
        print(f"{row['tokenizer']:<10}{row['workers']:>8}{row['tokens']:>14,}{row['seconds']:>9}"
              f"{row['tokens_per_sec_per_worker']:>14,}{row['mb_per_sec']:>8}{row['peak_rss_mb']:>8}{row['worker_peak_rss_mb']:>11}")
    print(f"loader samples/s (seq {seq_len}, batch {batch}): {loader}; cpu-smoke training consumes "
          f"{result['cpu_smoke_training_samples_per_sec']} samples/s: "
          f"{result['loader_over_training']}x (target >= 50x)")


if __name__ == "__main__":
    main()
