#!/usr/bin/env bash
# The main job on a fresh machine: set up, turn the Python standard library's own
# sources into byte-level shards, train configs/cpu-smoke.yaml on CPU for a few
# minutes (after showing that 3 preprocessing tasks and their merge write the same
# dataset), show the validation loss before and after and megamem eval's measures
# of the trained model; then the same model split over two processes (tensor
# parallelism, pipeline stages) for 20 steps against one process, a run re-cut
# for another layout (megamem reshard), a run preempted by SIGTERM to its whole
# process group that resumes exactly, a sample of generated text, and the model
# exported for Hugging Face transformers, decoding there.
#   DATA=data/stdlib RUN=runs/cpu-smoke bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
data=${DATA:-data/stdlib}
run=${RUN:-runs/cpu-smoke}
stdlib=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
if [ ! -f "$data/manifest.json" ]; then
  # the library alone: what is installed into it (site-packages) differs from machine to machine
  megamem preprocess --input "$stdlib/**/*.py" --exclude "*/site-packages/*" "*/dist-packages/*" \
    --output "$data" --seq-len 128 --workers 2
fi
echo
echo "the same corpus as 3 tasks (as a SLURM array would run them) and a merge, against the one-task dataset:"
rm -rf "$data-tasks"
for task in 0 1 2; do
  megamem preprocess --input "$stdlib/**/*.py" --exclude "*/site-packages/*" "*/dist-packages/*" \
    --output "$data-tasks" --seq-len 128 --workers 1 --task $task --num-tasks 3 2>/dev/null | sed 's/^/  /'
done
megamem preprocess --merge "$data-tasks" 2>/dev/null | head -1 | sed 's/^/  /'
python - "$data" "$data-tasks" <<'PY'
import json, sys
from pathlib import Path
one, tasks = map(Path, sys.argv[1:])
shards = sorted(p.name for p in one.glob("*.tar"))
same = shards == sorted(p.name for p in tasks.glob("*.tar")) and all(
    (one / n).read_bytes() == (tasks / n).read_bytes() for n in shards)
manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, tasks)]
same = same and all(manifests[0][k] == manifests[1][k] for k in ("shards", "valid_shards", "sources")) and all(
    manifests[1]["counts"].get(k) == v for k, v in manifests[0]["counts"].items())
print(f"  {len(shards)} shards and the manifest's records: {'byte for byte the same' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
PY
rm -rf "$data-tasks"
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
megamem eval "$run" --data "$data"

echo
echo "tensor and pipeline parallelism: 20 steps in one process, then over 2 processes as parallel.tp=2 and as parallel.pp=2"
short=(configs/cpu-smoke.yaml --set data.path="$data" --set train.steps=20 --set logging.interval=5
       --set data.num_workers=1)
# one thread per process in every run, so that all sum in the same order and the losses agree to rounding
[ -f "$run-tp1/checkpoints/step-00000020/megamem.json" ] || \
  OMP_NUM_THREADS=1 megamem train "${short[@]}" --set run.dir="$run-tp1" >/dev/null
[ -f "$run-tp2/checkpoints/step-00000020/megamem.json" ] || \
  OMP_NUM_THREADS=1 megamem train "${short[@]}" --set run.dir="$run-tp2" --set parallel.tp=2 --nproc 2 >/dev/null 2>&1
[ -f "$run-pp2/checkpoints/step-00000020/megamem.json" ] || \
  OMP_NUM_THREADS=1 megamem train "${short[@]}" --set run.dir="$run-pp2" --set parallel.pp=2 --nproc 2 >/dev/null 2>&1
python - "$run-tp1" "$run-tp2" "$run-pp2" <<'PY'
import json, sys
one, two, pipe = ([json.loads(line) for line in open(f"{run}/metrics.jsonl") if '"loss"' in line]
                  for run in sys.argv[1:])
print(f"{'step':>6}{'loss, 1 process':>18}{'loss, tp=2':>14}{'loss, pp=2':>14}{'tp bytes/token fwd + bwd':>28}")
for a, b, c in zip(one, two, pipe):
    print(f"{a['step']:>6}{a['loss']:>18.5f}{b['loss']:>14.5f}{c['loss']:>14.5f}"
          f"{b['tp_forward_bytes_per_token']:>16,.0f} + {b['tp_backward_bytes_per_token']:,.0f}")
print("Same seed, same model: the split runs add some sums in another order (p's gradient, the softmax), so the\n"
      "losses agree to rounding until such a difference sends a chunk lying near zero to its other row; from\n"
      "then on the runs drift apart as any two runs of a hashing model do.")
PY
echo
echo "changing the layout: the tp=2 run's checkpoint re-cut for one process (megamem reshard), 5 more steps"
if [ ! -f "$run-resharded/checkpoints/step-00000025/megamem.json" ]; then
  rm -rf "$run-resharded"
  megamem reshard "$run-tp2" --tp 1 --pp 1 --output "$run-resharded" --set train.steps=25 2>/dev/null | tail -1
  OMP_NUM_THREADS=1 megamem train "$run-resharded/config.yaml" 2>/dev/null | grep "resumed from" || true
fi
python - "$run-resharded" <<'PY'
import json, sys
print("  ".join(f"step {r['step']}: {r['loss']:.4f}" for r in map(json.loads, open(f"{sys.argv[1]}/metrics.jsonl"))
                if "loss" in r))
PY
echo
echo "preemption: SIGTERM to the whole process group (DataLoader workers too) after step 10, then --resume auto"
if [ ! -f "$run-preempted/checkpoints/step-00000020/megamem.json" ]; then
  rm -rf "$run-preempted"
  OMP_NUM_THREADS=1 python - "$run-preempted" "${short[@]}" <<'PY'
import json, os, signal, subprocess, sys, time
run, args = sys.argv[1], sys.argv[2:]
command = ["megamem", "train", *args, "--set", f"run.dir={run}", "--set", "data.num_workers=2"]
job = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
metrics = f"{run}/metrics.jsonl"
while job.poll() is None and not (os.path.exists(metrics) and '"step": 10,' in open(metrics).read()):
    time.sleep(0.05)
os.killpg(job.pid, signal.SIGTERM)
output = job.communicate()[0]
print("".join(f"  {line}\n" for line in output.splitlines() if "stopping at step" in line).rstrip()
      + f"\n  exit status {job.returncode}")
resumed = subprocess.run(command, capture_output=True, text=True)
print("".join(f"  {line}\n" for line in resumed.stdout.splitlines() if "resumed from" in line).rstrip())
PY
fi
python - "$run-tp1" "$run-preempted" <<'PY'
import json, sys
straight, resumed = ({r["step"]: r["loss"] for r in map(json.loads, open(f"{run}/metrics.jsonl")) if "loss" in r}
                     for run in sys.argv[1:])
print("  ".join(f"step {step}: {resumed[step]:.6f} (uninterrupted {straight[step]:.6f})"
                for step in sorted(resumed) if step > 10))
PY
echo
echo "a sample from the trained model (megamem generate, KV cache, temperature 0.8):"
megamem generate "$run" --prompt "def " --max-new-tokens 160 --temperature 0.8 --seed 1
echo
echo "the same model in Hugging Face transformers (megamem export --format hf), sampling at temperature 0.8:"
megamem export "$run" --format hf --output "$run/hf" >/dev/null
(cd "$run/hf" && python - <<'PY'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.set_verbosity_error()
logging.disable_progress_bar()
model = AutoModelForCausalLM.from_pretrained(".", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(".", trust_remote_code=True)
torch.manual_seed(1)
out = model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=120, do_sample=True, temperature=0.8,
                     top_k=0)
print(tokenizer.decode(out[0], skip_special_tokens=True))
PY
)
