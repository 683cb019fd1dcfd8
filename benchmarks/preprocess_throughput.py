"""Preprocessing and loading throughput on a real corpus of at least 100 MB.

The corpus is the Python standard library's own sources (every machine has them),
written as jsonl, one document per file, and repeated until it reaches --corpus-mb.
Measured: tokens per second per worker and peak RSS for the byte-level tokenizer
(1 and 2 workers) and a 32k byte-level BPE trained here; the loader's samples per
second at cpu-smoke's shape against the samples per second cpu-smoke training
actually consumes on this machine (target: at least 50x).

Per core, on the same corpus and BPE, in turns: the `tokenizers` library's own
`encode_batch` over the texts held in memory with one thread (the ceiling: nothing
but tokenizing), `megamem preprocess` with one worker (reading, tokenizing, packing,
writing shards), and datatrove's `DocumentTokenizer` (one task, one worker, reading
the same jsonl; shuffling off, as megamem leaves that to its loader), the peer a
user would pick instead. datatrove is not a dependency: install it apart
(`pip install --target DIR datatrove`) and pass `--datatrove-path DIR`. Targets:
megamem at least 0.8x the ceiling and at least datatrove.

    python benchmarks/preprocess_throughput.py [--corpus-mb 100] [--datatrove-path DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from megamem.config import load_config
from megamem.data_tools.loader import TrainLoader
from megamem.data_tools.preprocess import PreprocessArgs, preprocess
from megamem.data_tools.preprocess_tasks import TASKS, merge, run_task
from megamem.data_tools.shards import load_manifest
from megamem.data_tools.tokenizer import train_bpe
from megamem.model import build_model, lm_loss

REPO = Path(__file__).resolve().parents[1]


def build_corpus(directory: Path, megabytes: float) -> Path:
    sources = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")
                     if "site-packages" not in p.parts and "dist-packages" not in p.parts)
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


def per_core(corpus: Path, tokenizer: Path, tmp: Path, datatrove_path: str | None, seq_len: int) -> dict:
    """Tokens per second on one core: the tokenizers library alone, megamem preprocess, datatrove."""
    from tokenizers import Tokenizer

    texts = [json.loads(line)["text"] for line in open(corpus)]
    ceiling = Tokenizer.from_file(str(tokenizer))
    started, tokens = time.perf_counter(), sum(1 for t in texts if t.strip())   # an end-of-document each, as megamem
    for at in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in ceiling.encode_batch(texts[at:at + 1000], add_special_tokens=False))
    rows = {"tokenizers_encode_batch": tokens / (time.perf_counter() - started)}
    started, cpu = time.perf_counter(), time.process_time()
    ours = run_preprocess(corpus, tmp / "bpe-1", str(tokenizer), 1, seq_len)
    rows["megamem_cores_used"] = (time.process_time() - cpu) / (time.perf_counter() - started)
    assert ours["tokens"] == tokens, (ours["tokens"], tokens)
    rows["megamem_preprocess"] = ours["tokens_per_sec"]
    if datatrove_path:
        sys.path.append(datatrove_path)
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.tokens import DocumentTokenizer

        pipeline = [JsonlReader(str(corpus.parent), glob_pattern=corpus.name),
                    DocumentTokenizer(str(tmp / "datatrove"), tokenizer_name_or_path=str(tokenizer),
                                      eos_token="<|endoftext|>", shuffle_documents=False)]
        started, cpu = time.perf_counter(), time.process_time()
        LocalPipelineExecutor(pipeline, tasks=1, workers=1, logging_dir=str(tmp / "datatrove-logs")).run()
        rows["datatrove_cores_used"] = (time.process_time() - cpu) / (time.perf_counter() - started)
        written = sum(p.stat().st_size for p in (tmp / "datatrove").glob("*.ds"))
        rows["datatrove_document_tokenizer"] = written / 2 / (time.perf_counter() - started)   # uint16 tokens
        rows["datatrove_tokens"] = written // 2
    result = {name: round(value, 2) if "cores" in name else round(value) for name, value in rows.items()}
    result["megamem_over_ceiling"] = round(rows["megamem_preprocess"] / rows["tokenizers_encode_batch"], 3)
    if datatrove_path:
        result["megamem_over_datatrove"] = round(rows["megamem_preprocess"] / rows["datatrove_document_tokenizer"],
                                                 3)
    return result


def merge_cost(corpus: Path, tokenizer: Path, tmp: Path, seq_len: int) -> dict:
    """Two tasks (two workers each, one after the other) and their merge: what the merge reads and writes per
    byte of text, and how fast."""
    out = tmp / "tasks"
    for task in range(2):
        run_task(PreprocessArgs([str(corpus)], str(out), seq_len=seq_len, tokenizer=str(tokenizer), workers=2,
                                shard_size_mb=16), task, 2)
    read = sum(p.stat().st_size for p in (out / TASKS).rglob("*.bin"))
    started = time.perf_counter()
    merge(out)
    seconds = time.perf_counter() - started
    written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    text = corpus.stat().st_size
    return {"read_bytes_per_text_byte": round(read / text, 3), "written_bytes_per_text_byte": round(written / text, 3),
            "merge_mb_per_sec_of_text": round(text / 1e6 / seconds, 1)}


def at_scale(cores: dict, bpe_row: dict, merge: dict) -> dict:
    """1 TB of text on N nodes of C cores, from the measured per-core rate (tokenizing spreads over every core;
    the merge is one process)."""
    text_bytes_per_token = bpe_row["mb_per_sec"] * 1e6 / bpe_row["tokens_per_sec"]
    per_core = cores["megamem_preprocess"] * text_bytes_per_token              # text bytes per second per core
    hours = {f"{nodes}x{per_node}": round(1e12 / (per_core * nodes * per_node) / 3600, 2)
             for nodes in (1, 8, 64) for per_node in (32, 64)}
    return {"text_bytes_per_token": round(text_bytes_per_token, 2),
            "text_mb_per_sec_per_core": round(per_core / 1e6, 2),
            "tokenize_hours_per_tb_by_nodes_x_cores": hours,
            "merge_reads_gb_per_tb": round(merge["read_bytes_per_text_byte"] * 1e3),
            "merge_writes_gb_per_tb": round(merge["written_bytes_per_text_byte"] * 1e3),
            "merge_hours_per_tb": round(1e12 / (merge["merge_mb_per_sec_of_text"] * 1e6) / 3600, 2),
            "task_peak_rss_mb": {"main": bpe_row["peak_rss_mb"], "per_worker": bpe_row["worker_peak_rss_mb"]}}


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
    parser.add_argument("--datatrove-path", help="a directory datatrove is installed into (pip install --target)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = "1"            # one core each: the tokenizers library would take them all
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
        cores = per_core(corpus, bpe.path, tmp, args.datatrove_path, seq_len)
        scale = at_scale(cores, rows[-1], merge_cost(corpus, bpe.path, tmp, 2048))     # a pretraining length

        batch = load_config([REPO / "configs/cpu-smoke.yaml"]).train.micro_batch_size
        consumed = training_rate()
        loader = {f"workers_{w}": round(loader_rate(tmp / "byte-1", batch, w)) for w in (0, 2)}
        best = max(loader.values())
        result = {"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "preprocess": rows,
                  "bpe_train_seconds": round(bpe_seconds, 1), "bpe_vocab_size": bpe.vocab_size,
                  "bpe_tokens_per_sec_per_core": cores, "target_megamem_over_ceiling": 0.8, "scale": scale,
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
    print(f"BPE-32k tokens/s on one core: {cores}")
    print(f"megamem preprocess / tokenizers encode_batch alone: {cores['megamem_over_ceiling']} (target >= 0.8)")
    if "megamem_over_datatrove" in cores:
        print(f"megamem preprocess / datatrove DocumentTokenizer: {cores['megamem_over_datatrove']} (target >= 1)")
    print(f"1 TB of text, BPE-32k: {scale['tokenize_hours_per_tb_by_nodes_x_cores']} hours by nodes x cores; the "
          f"merge reads {scale['merge_reads_gb_per_tb']} GB and writes {scale['merge_writes_gb_per_tb']} GB "
          f"({scale['merge_hours_per_tb']} h); a task's peak RSS {scale['task_peak_rss_mb']} MB")
    print(f"loader samples/s (seq {seq_len}, batch {batch}): {loader}; cpu-smoke training consumes "
          f"{result['cpu_smoke_training_samples_per_sec']} samples/s: "
          f"{result['loader_over_training']}x (target >= 50x)")


if __name__ == "__main__":
    main()
