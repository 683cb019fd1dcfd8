"""The verdict of scripts/gpu_check.sh: every check of OUT_DIR against its target, a table, and the exit status.

    python scripts/gpu_check.py OUT_DIR [--report]

gpu_check.sh runs the checks and lists them in OUT_DIR/checks.json (name, exit
status, seconds, log); each check's results lie beside it. A check passes when
its command succeeded and its figures meet their targets:
- the Triton kernel tests, compiled: every test passed;
- Triton against `reference` at the MF-tiny, small and base layer shapes
  (benchmarks/kernel_parity.py, fp32 and bf16): every output and gradient within
  its bound, table gradients bit-identical on a repeat;
- Memory Layer speed (benchmarks/memory_layer.py, bf16): Triton's forward+backward
  at least TRITON_SPEEDUP x the reference's, and its forward moving at least
  TRITON_BANDWIDTH of the copy bandwidth on the bytes that must come from memory;
- whole-model throughput: the benchmark ran (its ratios are reported);
- 20 bf16 training steps of MF-tiny on Triton: the loss fell and no step was
  skipped;
- fp16: a non-finite loss in step 2 is skipped and counted, and the dynamic loss
  scale halves.
Any miss exits 1 (`--report`: print the same table and exit 0).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

TRITON_SPEEDUP = 5.0
TRITON_BANDWIDTH = 0.5


@dataclass
class Verdict:
    name: str
    status: str          # ok, MISSED, FAILED (the command), TIMEOUT
    seconds: int
    figures: str


def _losses(metrics: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}


def kernel_tests(out: Path) -> tuple[bool, str]:
    last = (out / "kernel_tests.log").read_text().strip().splitlines()[-1]
    return "passed" in last and "failed" not in last and "error" not in last, last


def kernel_parity(out: Path) -> tuple[bool, str]:
    result = json.loads((out / "kernel_parity.json").read_text())
    worst = {}
    for row in result["rows"]:
        error = max(row["y_error"], row["dx_error"], row["dtables_error"])
        worst[row["dtype"]] = max(worst.get(row["dtype"], 0.0), error)
    misses = [f"{r['layer']} {r['dtype']}" for r in result["rows"] if not r["ok"]]
    figures = ", ".join(f"{dtype} worst {error:.1e}" for dtype, error in worst.items())
    return not misses and bool(result["rows"]), figures + (f"; MISSED: {', '.join(misses)}" if misses else "")


def memory_layer(out: Path) -> tuple[bool, str]:
    result = json.loads((out / "memory_layer_cuda.json").read_text())
    speedups = {layer: s["triton_fwdbwd_speedup_vs_reference"] for layer, s in result["summary"].items()}
    fractions = {r["layer"]: r["bandwidth_fraction"] for r in result["rows"] if r["impl"] == "triton"}
    slow = [layer for layer, s in speedups.items() if s < TRITON_SPEEDUP]
    starved = [layer for layer, f in fractions.items() if f < TRITON_BANDWIDTH]
    figures = (f"fwd+bwd vs reference x{min(speedups.values())}-x{max(speedups.values())} (target "
               f"{TRITON_SPEEDUP:g}), bandwidth {min(fractions.values()):.0%}-{max(fractions.values()):.0%} of copy "
               f"(target {TRITON_BANDWIDTH:.0%})")
    if slow or starved:
        figures += f"; MISSED: {', '.join([*(f'{s} speed' for s in slow), *(f'{s} bandwidth' for s in starved)])}"
    return bool(speedups) and not slow and not starved, figures


def throughput(out: Path) -> tuple[bool, str]:
    summary = json.loads((out / "train_throughput_cuda.json").read_text())["summary"]
    return True, "; ".join(f"{key}: train x{entry['whole/train']}, prefill512 x{entry['whole/prefill512']}, "
                           f"decode x{entry['whole/decode']} (MemoryFormer over dense, whole model)"
                           for key, entry in summary.items())


def bf16_training(out: Path) -> tuple[bool, str]:
    steps = _losses(out / "run" / "metrics.jsonl")
    first, last = steps[min(steps)], steps[max(steps)]
    skipped = int(last.get("skipped_steps", 0))
    figures = (f"loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']}, "
               f"{last['tokens_per_sec']:,.0f} tokens/s, {skipped} skipped")
    return last["loss"] < first["loss"] and skipped == 0, figures


def fp16_skip(out: Path) -> tuple[bool, str]:
    steps = _losses(out / "fp16" / "metrics.jsonl")
    scales = [steps[s]["loss_scale"] for s in sorted(steps)]
    ok = steps[2]["skipped"] == 1.0 and steps[max(steps)]["skipped_steps"] == 1.0 and scales[1] == scales[0] / 2
    return ok, f"step 2 skipped: {steps[2]['skipped'] == 1.0}, {steps[max(steps)]['skipped_steps']:.0f} counted, " \
               f"loss scale {scales[0]:g} -> {scales[1]:g}"


JUDGES = {"Triton kernel tests, compiled": kernel_tests, "Triton against reference, MF shapes": kernel_parity,
          "Memory Layer speed": memory_layer, "whole-model throughput": throughput,
          "20 bf16 steps of MF-tiny on Triton": bf16_training, "fp16 non-finite step skipped": fp16_skip}


def judge(out: Path) -> list[Verdict]:
    verdicts = []
    for check in json.loads((out / "checks.json").read_text()):
        status = {0: "ok", 124: "TIMEOUT", 137: "TIMEOUT"}.get(check["status"], "FAILED")
        try:
            met, figures = JUDGES[check["name"]](out)
        except (OSError, KeyError, ValueError, IndexError, ZeroDivisionError) as err:
            met, figures = False, f"(no figures: {type(err).__name__}: {err})"
        if status == "ok" and not met:
            status = "MISSED"
        verdicts.append(Verdict(check["name"], status, int(check["seconds"]), figures))
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--report", action="store_true", help="only report: exit 0 whatever the verdict")
    args = parser.parse_args(argv)
    verdicts = judge(args.out)
    print(f"\n{'check':<38}{'result':<8}{'seconds':>8}  figures")
    for v in verdicts:
        print(f"{v.name:<38}{v.status:<8}{v.seconds:>8}  {v.figures}")
    missed = [v.name for v in verdicts if v.status != "ok"]
    print(f"gpu_check: {len(verdicts) - len(missed)} of {len(verdicts)} checks met their targets"
          + (f"; not met: {', '.join(missed)}" if missed else ""))
    return 0 if args.report or not missed else 1


if __name__ == "__main__":
    sys.exit(main())
