#!/usr/bin/env bash
# What only a GPU shows, in one command on a CUDA machine, in about 9 minutes: the
# Triton kernel tests compiled for real, Triton against the reference kernel at the
# MF-tiny/small/base layer shapes (benchmarks/kernel_parity.py), benchmarks/
# memory_layer.py and benchmarks/train_throughput.py on the GPU, 20 bf16 training
# steps of MF-tiny on the Triton kernel, and an fp16 run's skip of a non-finite
# step. The project's set-up runs first (scripts/setup.sh keeps the CUDA torch in
# place). Every log and result lands in OUT_DIR; scripts/gpu_check.py then judges
# each check against its target (its docstring lists them), prints a table, and the
# exit status is non-zero when any check failed or missed (--report: only report).
# On a machine without CUDA it says so and exits 0, running nothing.
#   bash scripts/gpu_check.sh [--report] OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
report=()
if [ "${1:-}" = --report ]; then report=(--report); shift; fi
out=${1:?usage: bash scripts/gpu_check.sh [--report] OUT_DIR}
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

checks=()
check() {  # NAME SECONDS LOG COMMAND...: run COMMAND with a time limit, its output in OUT_DIR/LOG
  local name=$1 limit=$2 log=$3 start=$SECONDS status
  shift 3
  echo "gpu_check: $name (at most ${limit} s, log $out/$log)"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$out/$log" 2>&1
  status=$?
  checks+=("{\"name\": \"$name\", \"status\": $status, \"seconds\": $((SECONDS - start)), \"log\": \"$log\"}")
}

check "Triton kernel tests, compiled" 150 kernel_tests.log \
  python -m pytest -q -p no:cacheprovider tests/kernels
check "Triton against reference, MF shapes" 120 kernel_parity.log \
  python benchmarks/kernel_parity.py --device cuda --json "$out/kernel_parity.json"
check "Memory Layer speed" 120 memory_layer.log \
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
check "fp16 non-finite step skipped" 120 fp16.log env MEGAMEM_FAULT=loss:nan:3 \
  megamem train configs/memoryformer-tiny.yaml --set data.path="$out/data" --set run.dir="$out/fp16" \
    --set train.precision=fp16 --set train.steps=6 --set train.global_batch_size=32 --set train.eval_interval=100 \
    --set checkpoint.interval=100 --set logging.interval=1 --set data.num_workers=2

(IFS=,; echo "[${checks[*]}]") > "$out/checks.json"
python scripts/gpu_check.py "$out" "${report[@]}"
status=$?
echo "gpu_check: logs and results in $out"
exit $status
