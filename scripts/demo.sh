#!/usr/bin/env bash
# The main job on a fresh machine: set up, turn the Python standard library's own
# sources into byte-level shards, train configs/cpu-smoke.yaml on CPU for a few
# minutes, and show the validation loss before and after.
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
