"""How far apart runs end that differ only in the order of their sums: the bound the layouts are held to.

A hashing model's runs part ways whenever a sum is ordered differently: one
rounding flips a code, Adam moves the row it sends the token to, and the runs
drift apart (tests/training/runs.py). Under what ships (`model.kernel: auto`,
the fused kernel) the tensor-, pipeline- and data-parallel layouts can
therefore not match one process exactly; they must match it statistically. This
script measures the spread: cpu-smoke as it ships, on the training tests' corpus
(the `json` and `email` packages of this Python's standard library, 128-byte
sequences, a tenth kept for validation), for --steps steps, in one process, in
variants that compute the same sums in other orders: ZeRO 0, 1 and 3 (torch's
AdamW over each tensor, DeepSpeed's over flat partitions; ZeRO 2 sums as ZeRO 1
does in one process), the fused and the reference kernel (the same lookups and
weights, summed in another order), 1 and 2 threads (matmuls split their sums by
thread). The bound on the final validation loss of a layout against one process
as it ships (ZeRO 0, `auto`, one thread a rank, as the layouts run) is 4 sqrt(2) s,
s the variants' standard deviation: the difference of two runs with that spread
is sqrt(2) s wide, and a normal difference passes 4 of its widths less than once
in 10,000 tries. It then trains tp 2, pp 2 and dp 2 (ZeRO 1) the same way and
reports how far each lies from one process, in nats and in bounds
(tests/training/test_layout_statistics.py repeats those three runs against the
committed bound).

    python benchmarks/layout_spread.py [--steps 200] [--json benchmarks/results/layout_spread.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu-smoke.yaml"
ORDERS = {f"zero{zero}-{kernel}-{threads}t": (1, [f"parallel.zero_stage={zero}", f"model.kernel={kernel}"], threads)
          for zero in (0, 1, 3) for kernel in ("auto", "reference") for threads in (1, 2)}
REFERENCE = "zero0-auto-1t"         # one process as it ships, one thread a rank as the layouts run
LAYOUTS = {"tp2": (2, ["parallel.tp=2"], 1), "pp2": (2, ["parallel.pp=2"], 1),
           "dp2": (2, ["parallel.zero_stage=1"], 1)}
WIDTHS = 4          # the bound, in widths of the difference of two runs


def corpus(out: Path) -> Path:
    """The training tests' shards (tests/conftest.py makes the same)."""
    from megamem.data_tools.preprocess import PreprocessArgs, preprocess

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not (out / "manifest.json").is_file():
        preprocess(PreprocessArgs([str(stdlib / "json"), str(stdlib / "email")], str(out), seq_len=128,
                                  valid_fraction=0.1))
    return out


def settings(data: Path, run: Path, steps: int) -> list[str]:
    """What every run of the comparison shares: cpu-smoke as it ships, validated once, at the end."""
    return [f"data.path={data}", f"run.dir={run}", f"train.steps={steps}", f"train.eval_interval={steps}",
            f"checkpoint.interval={steps}", "logging.interval=50", "data.num_workers=0"]


def final_valid_loss(data: Path, root: Path, name: str, ranks: int, overrides: list[str], threads: int,
                     steps: int) -> float:
    run = root / name
    command = [sys.executable, "-m", "megamem.cli.main", "train", str(CONFIG), "--nproc", str(ranks)]
    for setting in [*settings(data, run, steps), *overrides]:
        command += ["--set", setting]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"layout_spread: {name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["valid_loss"] for r in reversed(records) if "valid_loss" in r)


def bound_of(orders: dict[str, float]) -> float:
    return WIDTHS * math.sqrt(2) * statistics.stdev(orders.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = corpus(Path(tmp) / "data")
        orders = {name: final_valid_loss(data, Path(tmp), name, *spec, args.steps) for name, spec in ORDERS.items()}
        layouts = {name: final_valid_loss(data, Path(tmp), name, *spec, args.steps)
                   for name, spec in LAYOUTS.items()}
    bound = bound_of(orders)
    reference = orders[REFERENCE]
    result = {"steps": args.steps, "config": str(CONFIG.relative_to(REPO)), "python": platform.python_version(),
              "reference": REFERENCE,
              "orders": orders, "spread": statistics.stdev(orders.values()), "bound": bound,
              "layouts": {name: {"valid_loss": loss, "difference": loss - reference,
                                 "in_bounds": abs(loss - reference) / bound}
                          for name, loss in layouts.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"final validation loss after {args.steps} steps, one process, sums in other orders:")
    for name, loss in orders.items():
        print(f"  {name:<20}{loss:.5f}")
    print(f"spread (standard deviation) {result['spread']:.5f}; bound {WIDTHS} sqrt(2) x spread = {bound:.5f}")
    for name, row in result["layouts"].items():
        print(f"  {name:<20}{row['valid_loss']:.5f}  {row['difference']:+.5f} against {REFERENCE} "
              f"({row['in_bounds']:.2f} of the bound)")


if __name__ == "__main__":
    main()
