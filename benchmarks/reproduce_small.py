"""A small reproduction of the paper's comparison: MemoryFormer against its dense baseline on real text.

Trains, on the same shards and for the same tokens, configs/cpu-smoke.yaml as a
MemoryFormer with each weighting of the retrieved rows (`paper`: p alone;
`l1`: p times the chunk's L1 norm, as the released code does) and as the dense
baseline with the same d, layers, heads, sequence length and tokenizer. Each
variant runs at a few learning rates (the paper trains MemoryFormer at 3x the
dense LR; the grids hold that point) and is reported at its best. For each best
run: validation loss and bits per byte (megamem eval), tokens, counted MACs per
token, parameters (tables apart), wall-clock seconds and the per-layer
normalised entropy of bucket use (the paper's Figure 4). Writes
OUT/results.json, OUT/curves.png (validation loss against tokens) and
OUT/buckets.png (each best MemoryFormer's bucket use), and prints a table.
Finished runs are kept under OUT/runs and reused, so an interrupted
reproduction resumes where it stopped.

    python benchmarks/reproduce_small.py                   # the standard library's sources, 614,400 tokens
    python benchmarks/reproduce_small.py --data data/corpus --tokens 2000000
    python benchmarks/reproduce_small.py --quick           # tiny sizes, one LR each (a smoke test)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu-smoke.yaml"
VARIANTS = {"memoryformer_paper": ("memoryformer", "paper"), "memoryformer_l1": ("memoryformer", "l1"),
            "dense": ("dense", "paper")}
LRS = {"dense": (1e-3, 3e-3, 6e-3), "memoryformer_paper": (3e-3, 9e-3, 1.8e-2, 3.6e-2, 7.2e-2),
       "memoryformer_l1": (1.5e-3, 3e-3, 6e-3, 9e-3)}
QUICK_LRS = {"dense": (3e-3,), "memoryformer_paper": (9e-3,), "memoryformer_l1": (6e-3,)}
QUICK_MODEL = ["model.hidden_size=64", "model.num_heads=2", "model.num_layers=1", "train.eval_steps=4"]
EVALS_PER_RUN = 6
EVAL_BATCHES = 50       # 25,600 validation tokens at cpu-smoke's sizes: steadier than its 8 for choosing an LR


def megamem(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    result = subprocess.run([sys.executable, "-m", "megamem.cli.main", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"reproduce_small: megamem {argv[0]} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result


def default_data(out: Path, quick: bool) -> Path:
    """The standard library's Python sources as byte-level shards of 128 tokens (megamem preprocess)."""
    data = out / "data"
    if not (data / "manifest.json").is_file():
        stdlib = sysconfig.get_paths()["stdlib"]
        pattern = f"{stdlib}/[a-c]*.py" if quick else f"{stdlib}/**/*.py"
        megamem("preprocess", "--input", pattern, "--output", str(data), "--seq-len", "128", "--workers", "2")
    return data


def data_overrides(data: Path) -> list[str]:
    """The model's sequence length and vocabulary, and the tokenizer, from the dataset's manifest."""
    manifest = json.loads((data / "manifest.json").read_text())
    tokenizer = manifest["tokenizer"]
    return [f"data.path={data}", f"model.seq_len={manifest['seq_len']}", f"model.vocab_size={tokenizer['vocab_size']}",
            f"data.tokenizer={tokenizer['path'] or 'byte'}"]


def train(out: Path, variant: str, lr: float, steps: int, overrides: list[str]) -> dict:
    """One run (reused when it already finished): its validation curve, seconds and final measures."""
    arch, weighting = VARIANTS[variant]
    run = out / "runs" / f"{variant}-lr{lr:g}"
    done = run / "checkpoints" / f"step-{steps:08d}" / "megamem.json"
    timing = run / "reproduce_seconds.json"
    if not (done.is_file() and timing.is_file()):
        start = time.perf_counter()
        settings = [*overrides, f"run.dir={run}", f"model.arch={arch}", f"model.weighting={weighting}",
                    f"optimizer.lr={lr}", f"schedule.min_lr={lr / 10}", f"train.steps={steps}",
                    f"train.eval_interval={max(1, steps // EVALS_PER_RUN)}", f"checkpoint.interval={steps}",
                    "checkpoint.keep=1", "data.num_workers=1"]
        megamem("train", str(CONFIG), *[part for setting in settings for part in ("--set", setting)])
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"run": run, "lr": lr, "seconds": json.loads(timing.read_text())["seconds"],
            "curve": [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r],
            "buckets": next((r["buckets"] for r in reversed(records) if "buckets" in r), {})}


def measures(result: dict, data: Path) -> dict:
    """What results.json reports of a best run."""
    from megamem.config import load_config
    from megamem.flops import flops_report
    from megamem.model import build_model
    from megamem.model.memory_layer import MemoryLayer

    evaluation = json.loads(megamem("eval", str(result["run"]), "--data", str(data), "--json").stdout)
    config = load_config([result["run"] / "config.yaml"])
    model = build_model(config, device="meta")
    tables = sum(m.tables.numel() for m in model.modules() if isinstance(m, MemoryLayer))
    tokens_per_step = config.train.global_batch_size * config.model.seq_len
    entry = {"valid_loss": evaluation["loss"], "bits_per_byte": evaluation["bits_per_byte"],
             "tokens": config.train.steps * tokens_per_step,
             "macs_per_token": flops_report(config, config.model.seq_len)["model"]["macs_per_token"],
             "table_params": tables, "other_params": sum(p.numel() for p in model.parameters()) - tables,
             "seconds": round(result["seconds"], 1), "lr": result["lr"], "weighting": config.model.weighting,
             "curve": [[step * tokens_per_step, loss] for step, loss in result["curve"]]}
    if config.model.arch == "memoryformer":
        entry["bucket_entropy"] = [stats["entropy"] for stats in result["buckets"].values()]
        entry["bucket_layers"] = list(result["buckets"])
    return entry


def bucket_counts(run: Path, data: Path, batches: int) -> dict:
    """Bucket hits of a trained MemoryFormer over validation batches: first and last table of each kind."""
    import torch

    from megamem.data_tools.loader import valid_batches
    from megamem.data_tools.shards import load_manifest
    from megamem.inference.load import load_trained
    from megamem.training.bucket_stats import BucketStats

    trained = load_trained(run)
    stats = BucketStats(trained.model)
    trained.model.train()                    # the observers count training-mode forwards; nothing here drops out
    with torch.no_grad():
        for batch in valid_batches([load_manifest(data)], 8, 0, 1, batches):
            trained.model(batch[:, :-1])
    return {name: counts.tolist() for name, counts in stats.histograms().items()}


def draw_curves(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in VARIANTS:
        entry = results[name]
        tokens, losses = zip(*entry["curve"], strict=True)
        axis.plot(tokens, losses, marker="o", markersize=3, label=f"{name} (lr {entry['lr']:g})")
    axis.set_xlabel("tokens")
    axis.set_ylabel("validation loss (nats)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def draw_buckets(histograms: dict, path: Path) -> None:
    """Per kind and table, each bucket's hits over the uniform share, buckets sorted: flat at 1 is uniform use."""
    import matplotlib.pyplot as plt

    kinds = ("qkv", "ml1", "ml2")
    tables = sorted({table for counts in histograms.values() for table in counts},
                    key=lambda table: (kinds.index(table.split("/")[0]), table))
    figure, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables), 3.4), sharey=True)
    for axis, table in zip(axes, tables, strict=True):
        for name, counts in histograms.items():
            hits = sorted(counts[table], reverse=True)
            mean = sum(hits) / len(hits) or 1
            axis.plot([h / mean for h in hits], label=name)
        axis.set_title(table, fontsize=9)
        axis.set_yscale("symlog", linthresh=0.1)
        axis.set_xlabel("bucket (by hits)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("hits / uniform share")
    axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="megamem preprocess output (default: the standard library)")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per run (default 614,400; "
                                                                 "--quick 20,480)")
    parser.add_argument("--quick", action="store_true", help="a 64-wide, 1-block model, one LR per variant")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce-small")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or default_data(args.out, args.quick)
    if not (data / "manifest.json").is_file():
        sys.exit(f"reproduce_small: no dataset at {data} (no manifest.json). Fix: pass --data a megamem preprocess "
                 f"output, or leave it out to use the standard library")
    overrides = data_overrides(data) + (QUICK_MODEL if args.quick else [f"train.eval_steps={EVAL_BATCHES}"])
    from megamem.config import load_config

    base = load_config([CONFIG], overrides)
    tokens_per_step = base.train.global_batch_size * base.model.seq_len
    tokens = args.tokens or (20 * tokens_per_step if args.quick else 600 * tokens_per_step)
    steps = max(EVALS_PER_RUN, math.ceil(tokens / tokens_per_step))
    results, best_runs = {}, {}
    for variant in VARIANTS:
        runs = [train(args.out, variant, lr, steps, overrides) for lr in (QUICK_LRS if args.quick else LRS)[variant]]
        sweep = {f"{r['lr']:g}": r["curve"][-1][1] for r in runs}
        best = min(runs, key=lambda r: r["curve"][-1][1])
        best_runs[variant] = best["run"]
        results[variant] = {**measures(best, data), "lr_sweep": sweep}
        print(f"  {variant}: best lr {best['lr']:g} of {sweep}", file=sys.stderr)
    better = min(("memoryformer_paper", "memoryformer_l1"), key=lambda v: results[v]["valid_loss"])
    results = {"memoryformer": {**results[better], "variant": better}, **results,
               "setup": {"config": str(CONFIG.relative_to(REPO)), "overrides": overrides, "steps": steps,
                         "tokens_per_step": tokens_per_step, "threads": int(os.environ.get("OMP_NUM_THREADS", 0))
                         or os.cpu_count(), "quick": args.quick, "data": str(data)}}
    histograms = {variant: bucket_counts(best_runs[variant], data, 4) for variant in ("memoryformer_paper",
                                                                                   "memoryformer_l1")}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    draw_curves(results, args.out / "curves.png")
    draw_buckets(histograms, args.out / "buckets.png")
    print(json.dumps(results, indent=2))
    print(f"\n{steps} steps x {tokens_per_step} tokens per run; {args.out}/results.json, curves.png, buckets.png")
    print(f"{'variant':<20}{'lr':>8}{'valid loss':>12}{'bits/byte':>11}{'MACs/token':>13}{'tables':>12}"
          f"{'other params':>14}{'seconds':>9}  LR sweep (final valid loss)")
    for name, entry in results.items():
        if name in ("memoryformer", "setup"):
            continue
        print(f"{name:<20}{entry['lr']:>8g}{entry['valid_loss']:>12.4f}{entry['bits_per_byte']:>11.4f}"
              f"{entry['macs_per_token']:>13,}{entry['table_params']:>12,}{entry['other_params']:>14,}"
              f"{entry['seconds']:>9.0f}  " + ", ".join(f"{lr}: {loss:.4f}" for lr, loss in entry["lr_sweep"].items()))
    print(f"better MemoryFormer weighting here: {results['memoryformer']['weighting']}")


if __name__ == "__main__":
    main()
