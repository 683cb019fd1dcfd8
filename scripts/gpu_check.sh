#!/usr/bin/env bash
# What only a GPU shows, in one command on a CUDA machine, in about 8 minutes: the
# Triton kernel tests compiled for real, benchmarks/memory_layer.py and
# benchmarks/train_throughput.py on the GPU, and 20 bf16 training steps of MF-tiny
# on the Triton kernel. The project's set-up runs first (scripts/setup.sh keeps
# the CUDA torch in place). Every log and result lands in OUT_DIR, a summary table
# ends the output, and the exit status is non-zero when any check failed. On a
# machine without CUDA it says so and exits 0, running nothing.
#   bash scripts/gpu_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
python=${PYTHON:-python3}
if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here ($python's torch sees none, or there is no torch): nothing to check." \
       "Run it on a machine with an NVIDIA GPU."
  exit 0
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
if ! bash scripts/setup.sh > "$out/setup.log" 2>&1; then
  echo "gpu_check: the set-up failed; see $out/setup.log"
  exit 1
fi
source .venv/bin/activate

names=() statuses=() times=()
check() {  # NAME SECONDS LOG COMMAND...: run COMMAND with a time limit, its output in OUT_DIR/LOG
  local name=$1 limit=$2 log=$3 start=$SECONDS
  shift 3
  echo "gpu_check: $name (at most ${limit} s, log $out/$log)"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$out/$log" 2>&1
  statuses+=($?) names+=("$name") times+=($((SECONDS - start)))
}

check "Triton kernel tests, compiled" 150 kernel_tests.log \
  python -m pytest -q -p no:cacheprovider tests/kernels
check "Memory Layer benchmark" 120 memory_layer.log \
  python benchmarks/memory_layer.py --device cuda --dtype bf16 --json "$out/memory_layer_cuda.json"
check "whole-model throughput" 150 train_throughput.log \
  python benchmarks/train_throughput.py --device cuda --json "$out/train_throughput_cuda.json" \
    --png "$out/train_throughput_cuda.png"
stdlib=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
check "20 bf16 steps of MF-tiny on Triton" 180 train.log bash -c '
  megamem preprocess --input "$1/[a-m]*.py" --output "$2/data" --seq-len 2048 --workers 4 &&
  megamem train configs/memoryformer-tiny.yaml --set data.path="$2/data" --set run.dir="$2/run" \
    --set model.kernel=triton --set train.steps=20 --set train.global_batch_size=16 --set train.eval_interval=20 \
    --set train.eval_steps=2 --set checkpoint.interval=20 --set logging.interval=5 --set data.num_workers=2' \
  _ "$stdlib" "$out"

python - "$out" "${names[@]}" -- "${statuses[@]}" -- "${times[@]}" <<'PY'
import json, sys
from pathlib import Path

out, rest = Path(sys.argv[1]), sys.argv[2:]
first, second = rest.index("--"), len(rest) - 1 - rest[::-1].index("--")
names, statuses, times = rest[:first], rest[first + 1:second], rest[second + 1:]


def numbers(name):
    """The figures each check is judged by, where it wrote them."""
    try:
        if name.startswith("Memory Layer"):
            summary = json.loads((out / "memory_layer_cuda.json").read_text())
            rows = [r for r in summary["rows"] if r["impl"] == "triton"]
            speedups = [s["triton_fwdbwd_speedup_vs_reference"] for s in summary["summary"].values()]
            return (f"fwd+bwd vs reference x{min(speedups)}-x{max(speedups)} (target 5), bandwidth "
                    f"{min(r['bandwidth_fraction'] for r in rows):.0%}-{max(r['bandwidth_fraction'] for r in rows):.0%}"
                    f" of copy (target 50%)")
        if name.startswith("whole-model"):
            summary = json.loads((out / "train_throughput_cuda.json").read_text())["summary"]
            return "; ".join(f"{key}: train x{entry['whole/train']}, prefill512 x{entry['whole/prefill512']}, "
                             f"decode x{entry['whole/decode']} (MemoryFormer over dense, whole model)"
                             for key, entry in summary.items())
        if name.startswith("20 bf16"):
            records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
            losses = [r for r in records if "loss" in r]
            return (f"loss {losses[0]['loss']:.3f} at step {losses[0]['step']} -> {losses[-1]['loss']:.3f} at step "
                    f"{losses[-1]['step']}, {losses[-1]['tokens_per_sec']:,.0f} tokens/s")
        if name.startswith("Triton"):
            return (out / "kernel_tests.log").read_text().strip().splitlines()[-1]
    except (OSError, KeyError, ValueError, IndexError) as err:
        return f"(no figures: {err})"
    return ""


print(f"\n{'check':<38}{'result':<8}{'seconds':>8}  figures")
for name, status, seconds in zip(names, statuses, times):
    result = "ok" if status == "0" else "TIMEOUT" if status in ("124", "137") else "FAILED"
    print(f"{name:<38}{result:<8}{seconds:>8}  {numbers(name)}")
PY
failed=0
for status in "${statuses[@]}"; do [ "$status" = 0 ] || failed=1; done
echo "gpu_check: logs and results in $out"
exit $failed
