"""A small reproduction of the paper's comparison: MemoryFormer against its dense baseline on real text.

Trains, on the same shards and for the same tokens, configs/cpu-smoke.yaml as a
MemoryFormer with each weighting of the retrieved rows (`paper`: p alone; `l1`:
p times the chunk's L1 norm, as the released code does), `paper` once more with
one LR for the rest of the model and the tables' own (`optimizer.
table_lr_multiplier` swept; the other variants give the tables the model's
LR, whatever the config ships), and as the dense baseline with the same d, layers,
heads, sequence length and tokenizer. Every variant starts from a grid of the
same number of learning rates (GRID, factors of 2 apart); while its best lies
at an edge of its grid, the grid grows by one more step past that edge (at most
MAX_EXTENSIONS), so each best is one with a worse neighbour on either side. The
best is chosen on held-out text (the first EVAL_BATCHES batches of the
validation split, which training evaluates) and reported on a test split never
used for choosing (the next TEST_BATCHES batches). For each best run: held-out
and test loss, test bits per byte, tokens, counted MACs per token, parameters
(tables apart), wall-clock seconds and the per-layer normalised entropy of
bucket use (the paper's Figure 4). Writes OUT/results.json, OUT/curves.png
(held-out loss against tokens) and OUT/buckets.png (each best MemoryFormer's
bucket use), and prints a table. Finished runs and their test losses are kept
under OUT/runs and reused, so an interrupted reproduction resumes where it
stopped and a finished one is reported again without training.

    python benchmarks/reproduce_small.py                   # this Python's standard library, 614,400 tokens a run
    python benchmarks/reproduce_small.py --data data/corpus --tokens 2000000
    python benchmarks/reproduce_small.py --quick           # tiny sizes, one LR each, no grid (a smoke test)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu-smoke.yaml"
VARIANTS = {          # name: (arch, weighting, what the sweep sets)
    "memoryformer_paper": ("memoryformer", "paper", "optimizer.lr"),
    "memoryformer_paper_tables": ("memoryformer", "paper", "optimizer.table_lr_multiplier"),
    "memoryformer_l1": ("memoryformer", "l1", "optimizer.lr"),
    "dense": ("dense", "paper", "optimizer.lr"),
}
GRID = 4
STEP = 2.0
MAX_EXTENSIONS = 4
START = {"memoryformer_paper": 9e-3, "memoryformer_paper_tables": 3.0, "memoryformer_l1": 1.5e-3, "dense": 1.5e-3}
BASE_LR = 3e-3          # the rest of the model's LR where the tables' multiplier is swept: cpu-smoke's
QUICK_VALUES = {"memoryformer_paper": 9e-3, "memoryformer_paper_tables": 3.0, "memoryformer_l1": 6e-3,
                "dense": 3e-3}
QUICK_MODEL = ["model.hidden_size=64", "model.num_heads=2", "model.num_layers=1", "train.eval_steps=4"]
EVALS_PER_RUN = 6
EVAL_BATCHES = 50       # held out: 25,600 tokens at cpu-smoke's sizes, steadier than its 8 for choosing an LR
TEST_BATCHES = 100
QUICK_TEST_BATCHES = 4
STDLIB_EXCLUDE = ["*/site-packages/*", "*/dist-packages/*"]     # what is installed into it is not the library


def megamem(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    result = subprocess.run([sys.executable, "-m", "megamem.cli.main", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"reproduce_small: megamem {argv[0]} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result


def default_data(out: Path, quick: bool) -> Path:
    """This Python's standard library, its own .py files only, as byte-level shards of 128 tokens."""
    data = out / "data"
    if not (data / "manifest.json").is_file():
        stdlib = sysconfig.get_paths()["stdlib"]
        pattern = f"{stdlib}/[a-c]*.py" if quick else f"{stdlib}/**/*.py"
        megamem("preprocess", "--input", pattern, "--exclude", *STDLIB_EXCLUDE, "--output", str(data), "--seq-len",
                "128", "--workers", "2")
    return data


def data_overrides(data: Path) -> list[str]:
    """The model's sequence length and vocabulary, and the tokenizer, from the dataset's manifest."""
    manifest = json.loads((data / "manifest.json").read_text())
    tokenizer = manifest["tokenizer"]
    return [f"data.path={data}", f"model.seq_len={manifest['seq_len']}", f"model.vocab_size={tokenizer['vocab_size']}",
            f"data.tokenizer={tokenizer['path'] or 'byte'}"]


def run_name(variant: str, value: float) -> str:
    return f"{variant}-{'tables' if 'multiplier' in VARIANTS[variant][2] else 'lr'}{value:g}"


def train(out: Path, variant: str, value: float, steps: int, overrides: list[str]) -> dict:
    """One run (reused when it already finished): its held-out curve, seconds and final measures."""
    arch, weighting, swept = VARIANTS[variant]
    run = out / "runs" / run_name(variant, value)
    done = run / "checkpoints" / f"step-{steps:08d}" / "megamem.json"
    timing = run / "reproduce_seconds.json"
    lr, multiplier = (BASE_LR, value) if swept == "optimizer.table_lr_multiplier" else (value, 1.0)
    if not (done.is_file() and timing.is_file()):
        start = time.perf_counter()
        settings = [*overrides, f"run.dir={run}", f"model.arch={arch}", f"model.weighting={weighting}",
                    f"optimizer.lr={lr}", f"optimizer.table_lr_multiplier={multiplier}", f"schedule.min_lr={lr / 10}",
                    f"train.steps={steps}",
                    f"train.eval_interval={max(1, steps // EVALS_PER_RUN)}", f"checkpoint.interval={steps}",
                    "checkpoint.keep=1", "data.num_workers=1"]
        megamem("train", str(CONFIG), *[part for setting in settings for part in ("--set", setting)])
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    return {"run": run, "value": value, "lr": lr, "seconds": json.loads(timing.read_text())["seconds"],
            "curve": curve, "held_out": curve[-1][1],
            "buckets": next((r["buckets"] for r in reversed(records) if "buckets" in r), {})}


def next_value(sweep: dict[float, float]) -> float | None:
    """The value past the edge the best of `sweep` ({value: held-out loss}) lies at, or None if it is inside."""
    values = sorted(sweep)
    best = min(values, key=sweep.get)
    if len(values) < 3 or values[0] < best < values[-1]:
        return None
    return best * STEP if best == values[-1] else best / STEP


def sweep_variant(out: Path, variant: str, steps: int, overrides: list[str], quick: bool) -> tuple[list, int]:
    """Every run of a variant's grid, grown past an edge while the best sits on it; and how often it grew."""
    values = [QUICK_VALUES[variant]] if quick else [START[variant] * STEP**i for i in range(GRID)]
    runs = {value: train(out, variant, value, steps, overrides) for value in values}
    extensions = 0
    while not quick and extensions < MAX_EXTENSIONS:
        value = next_value({v: r["held_out"] for v, r in runs.items()})
        if value is None:
            break
        runs[value] = train(out, variant, value, steps, overrides)
        extensions += 1
    return [runs[v] for v in sorted(runs)], extensions


def test_loss(run: Path, data: Path, batches: int) -> dict:
    """The trained model's loss and bits per byte on the test split: the validation batches after the held-out
    ones (cached beside the run)."""
    cached = run / "reproduce_test.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch

    from megamem.config import load_config
    from megamem.data_tools.loader import valid_batches
    from megamem.data_tools.shards import load_manifest
    from megamem.data_tools.tokenizer import load_tokenizer
    from megamem.inference.evaluate import evaluate
    from megamem.inference.load import load_trained

    config = load_config([run / "config.yaml"])
    held_out = config.train.eval_steps
    split = list(valid_batches([load_manifest(data)], config.train.micro_batch_size, 0, 1, held_out + batches))
    if len(split) <= held_out:
        sys.exit(f"reproduce_small: {data}'s validation split holds {len(split)} batches, no more than the "
                 f"{held_out} held out for choosing LRs: nothing is left to test on. Fix: preprocess with a larger "
                 f"--valid-fraction")
    trained = load_trained(run)
    tokenizer = load_tokenizer(config.data.tokenizer)
    with torch.no_grad():
        result = evaluate(trained.model, split[held_out:], tokenizer.token_bytes(), torch.device("cpu"))
    measured = {"test_loss": result.loss, "test_bits_per_byte": result.bits_per_byte, "test_tokens": result.tokens}
    cached.write_text(json.dumps(measured))
    return measured


def measures(result: dict, data: Path, test_batches: int) -> dict:
    """What results.json reports of a best run."""
    from megamem.config import load_config
    from megamem.flops import flops_report
    from megamem.model import build_model
    from megamem.model.memory_layer import MemoryLayer

    config = load_config([result["run"] / "config.yaml"])
    model = build_model(config, device="meta")
    tables = sum(m.tables.numel() for m in model.modules() if isinstance(m, MemoryLayer))
    tokens_per_step = config.train.global_batch_size * config.model.seq_len
    entry = {"valid_loss": result["held_out"], **test_loss(result["run"], data, test_batches),
             "tokens": config.train.steps * tokens_per_step,
             "macs_per_token": flops_report(config, config.model.seq_len)["model"]["macs_per_token"],
             "table_params": tables, "other_params": sum(p.numel() for p in model.parameters()) - tables,
             "seconds": round(result["seconds"], 1), "lr": result["lr"], "weighting": config.model.weighting,
             "table_lr_multiplier": config.optimizer.table_lr_multiplier,
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
        label = f"{name} (lr {entry['lr']:g}" + (f", tables x{entry['table_lr_multiplier']:g})"
                                                 if entry["table_lr_multiplier"] != 1 else ")")
        axis.plot(tokens, losses, marker="o", markersize=3, label=label)
    axis.set_xlabel("tokens")
    axis.set_ylabel("held-out loss (nats)")
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
    parser.add_argument("--quick", action="store_true", help="a 64-wide, 1-block model, one LR per variant, no grid")
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
    test_batches = QUICK_TEST_BATCHES if args.quick else TEST_BATCHES
    for variant in VARIANTS:
        runs, extensions = sweep_variant(args.out, variant, steps, overrides, args.quick)
        sweep = {f"{r['value']:g}": r["held_out"] for r in runs}
        best = min(runs, key=lambda r: r["held_out"])
        best_runs[variant] = best["run"]
        results[variant] = {**measures(best, data, test_batches), "swept": VARIANTS[variant][2], "lr_sweep": sweep,
                            "grid_extended_by": extensions, "best_inside_grid": next_value(
                                {r["value"]: r["held_out"] for r in runs}) is None and len(runs) >= 3}
        print(f"  {variant}: best {VARIANTS[variant][2]} {best['value']:g} of {sweep}", file=sys.stderr)
    memoryformers = [variant for variant in VARIANTS if variant.startswith("memoryformer")]
    better = min(memoryformers, key=lambda v: results[v]["valid_loss"])           # chosen on held-out text
    manifest = json.loads((data / "manifest.json").read_text())
    results = {"memoryformer": {**results[better], "variant": better}, **results,
               "setup": {"config": str(CONFIG.relative_to(REPO)), "overrides": overrides, "steps": steps,
                         "tokens_per_step": tokens_per_step, "threads": int(os.environ.get("OMP_NUM_THREADS", 0))
                         or os.cpu_count(), "quick": args.quick, "data": str(data),
                         "python": platform.python_version(), "files": manifest["counts"]["files"],
                         "held_out_batches": base.train.eval_steps, "test_batches": test_batches}}
    histograms = {variant: bucket_counts(best_runs[variant], data, 4) for variant in memoryformers}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    draw_curves(results, args.out / "curves.png")
    draw_buckets(histograms, args.out / "buckets.png")
    print(json.dumps(results, indent=2))
    print(f"\n{steps} steps x {tokens_per_step} tokens per run; {args.out}/results.json, curves.png, buckets.png")
    print(f"{'variant':<28}{'lr':>8}{'tables x':>9}{'held-out':>10}{'test':>9}{'bits/byte':>11}{'MACs/token':>12}"
          f"{'tables':>12}{'other':>10}{'seconds':>9}  sweep (held-out loss)")
    for name, entry in results.items():
        if name in ("memoryformer", "setup"):
            continue
        print(f"{name:<28}{entry['lr']:>8g}{entry['table_lr_multiplier']:>9g}{entry['valid_loss']:>10.4f}"
              f"{entry['test_loss']:>9.4f}{entry['test_bits_per_byte']:>11.4f}{entry['macs_per_token']:>12,}"
              f"{entry['table_params']:>12,}{entry['other_params']:>10,}{entry['seconds']:>9.0f}  "
              + ", ".join(f"{value}: {loss:.4f}" for value, loss in entry["lr_sweep"].items()))
    print(f"best MemoryFormer on held-out text: {better}")

if __name__ == "__main__":
    main()
