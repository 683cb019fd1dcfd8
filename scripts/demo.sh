#!/usr/bin/env bash
# The main job on a fresh machine: set up, turn the Python standard library's own
# sources into byte-level shards, train configs/cpu-smoke.yaml on CPU for a few
# minutes, and show the validation loss before and after; then the same model
# split over two processes (tensor parallelism) for 20 steps, against one process.
#   DATA=data/stdlib RUN=runs/cpu-smoke bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
data=${DATA:-data/stdlib}
run=${RUN:-runs/cpu-smoke}
stdlib=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
if [ ! -f "$data/manifest.json" ]; then
  megamem preprocess --input "$stdlib/**/*.py" --output "$data" --seq-len 128 --workers 2
fi
megamem train configs/cpu-smoke.yaml --set data.path="$data" --set run.dir="$run" --set data.num_workers=1
python - "$run" <<'PY'
import json, sys
records = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
(first_step, first), (last_step, last) = valid[0], valid[-1]
print(f"\nvalidation loss: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step} "
      f"({100 * (first - last) / first:.0f}% lower; perplexity {2.718281828 ** first:.1f} -> {2.718281828 ** last:.2f})")
print(f"watch it:  tensorboard --logdir {sys.argv[1]}/tensorboard")
PY

echo
echo "tensor parallelism: 20 steps in one process, then split over 2 processes (parallel.tp=2)"
short=(configs/cpu-smoke.yaml --set data.path="$data" --set train.steps=20 --set logging.interval=5
       --set data.num_workers=1)
# one thread per process in both runs, so that both sum in the same order and the losses agree to rounding
[ -f "$run-tp1/checkpoints/step-00000020/megamem.json" ] || \
  OMP_NUM_THREADS=1 megamem train "${short[@]}" --set run.dir="$run-tp1" >/dev/null
[ -f "$run-tp2/checkpoints/step-00000020/megamem.json" ] || \
  OMP_NUM_THREADS=1 megamem train "${short[@]}" --set run.dir="$run-tp2" --set parallel.tp=2 --nproc 2 >/dev/null 2>&1
python - "$run-tp1" "$run-tp2" <<'PY'
import json, sys
one, two = ([json.loads(line) for line in open(f"{run}/metrics.jsonl") if '"loss"' in line] for run in sys.argv[1:])
print(f"{'step':>6}{'loss, 1 process':>18}{'loss, tp=2':>14}{'tp bytes/token fwd + bwd':>28}")
for a, b in zip(one, two):
    print(f"{a['step']:>6}{a['loss']:>18.5f}{b['loss']:>14.5f}"
          f"{b['tp_forward_bytes_per_token']:>16,.0f} + {b['tp_backward_bytes_per_token']:,.0f}")
print("Same seed, same model: the split runs add some sums in another order (p's gradient, the softmax), so the\n"
      "losses agree to rounding until such a difference sends a chunk lying near zero to its other row; from\n"
      "then on the two runs drift apart as any two runs of a hashing model do.")
PY
