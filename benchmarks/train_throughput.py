"""Whole-model speed: a MemoryFormer against its dense baseline, in prefill, decode and training.

For each pair (MF-tiny / Pythia-70M; MF-small / Pythia-160M with --models
tiny,small), each part (the block stack alone, and the whole model with its
embedding and classifier head) and each phase:
  prefill512, prefill2048  forward tokens/s at that sequence length (batches of 2,048 tokens, 128 --quick);
  decode                   batch-1 tokens/s of `megamem generate` (KV cache): 128-token prompt, 128 new tokens,
                           timed from the first new token to the last;
  train                    tokens/s of a full step of the config's global batch (train.global_batch_size
                           sequences of seq 512): forward and backward timed on micro-batches of the
                           config's train.micro_batch_size sequences (16 in the shipped configs: 8,192
                           tokens), the AdamW step on its own; that step updates every table row, so it weighs
                           on a MemoryFormer (a billion table parameters at MF-small) until batches are large;
with the counted MACs per token (megamem flops; attention over the full square
at the phase's length) and the peak memory the phase needs: the growth of a
fresh process's resident memory (CPU) or the CUDA allocator's peak, from before
the model is built. fp32 on CPU, bf16 autocast on CUDA; Memory Layers on the
fastest kernel for the device (`auto`; `--kernels auto,reference` adds the
reference path), with the tables' packed copy kept in prefill and decode as
`megamem eval` and `generate` keep it, and not in training. Workloads run in
turns, best of --repeats, so a drifting machine treats every one alike. --quick
runs the cpu-smoke-sized pair at short lengths, once. Prints JSON and a table;
--png draws them.

    python benchmarks/train_throughput.py --device cpu --json out.json --png out.png
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
PAIRS = {"tiny": (("mf-tiny", "memoryformer-tiny", ()), ("pythia-70m", "pythia-70m", ())),
         "small": (("mf-small", "memoryformer-small", ()), ("pythia-160m", "pythia-160m", ())),
         "smoke": (("mf-smoke", "cpu-smoke", ()), ("dense-smoke", "cpu-smoke", ("model.arch=dense",)))}
PARTS = ("blocks", "whole")
PHASES = ("prefill512", "prefill2048", "decode", "train")
TARGETS = {"prefill512": 2.0, "decode": 4.0, "train": 1.5}      # MemoryFormer over dense, block stack, CPU
FULL = {"prefill512": 512, "prefill2048": 2048, "prompt": 128, "new": 128, "train": 512, "batch_tokens": 2048}
QUICK = {"prefill512": 64, "prefill2048": 128, "prompt": 16, "new": 16, "train": 64, "batch_tokens": 128}


def build(config_name: str, overrides, kernel: str, sizes: dict, device: torch.device):
    from megamem.config import load_config
    from megamem.model import build_model

    longest = max(sizes["prefill2048"], sizes["prompt"] + sizes["new"], sizes["train"] + 1)
    config = load_config([REPO / "configs" / f"{config_name}.yaml"],
                         [*overrides, f"model.kernel={kernel}", f"model.seq_len={longest}"])
    return build_model(config, device=device), config


def workload(model, config, optimizer, part: str, phase: str, sizes: dict, device: torch.device):
    """A callable that runs the phase once and returns (tokens, seconds) of what it measures. One AdamW serves
    both parts of a model (its state for a MemoryFormer's tables is gigabytes); a step of the block stack leaves
    the other parameters, which have no gradient then, as they are."""
    from megamem.inference.generate import generate
    from megamem.inference.load import keep_packed_tables
    from megamem.model import lm_loss
    from megamem.model.kv_cache import KVCache

    keep_packed_tables(model, keep=phase != "train")        # as megamem eval / generate, and as training
    vocab, d = config.model.vocab_size, config.model.hidden_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def blocks(x, cache=None):
        for index, block in enumerate(model.blocks):
            x = block(x) if cache is None else block(x, cache.layers[index])
        return x

    def seconds_of(fn):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    if phase.startswith("prefill"):
        seq = sizes[phase]
        batch = max(1, sizes["batch_tokens"] // seq)
        inputs = (torch.randint(vocab, (batch, seq), device=device) if part == "whole"
                  else torch.randn(batch, seq, d, device=device))
        run = model if part == "whole" else blocks

        def prefill():
            with torch.no_grad(), autocast:
                return batch * seq, seconds_of(lambda: run(inputs))
        return prefill

    if phase == "decode":
        prompt, new = sizes["prompt"], sizes["new"]
        tokens = torch.randint(vocab, (prompt,)).tolist()

        def decode_whole():
            stamps = []
            with autocast:        # eod_id -1: never stops early
                generate(model, tokens, new, vocab, -1, temperature=0, on_token=lambda _: stamps.append(
                    synchronize(device) or time.perf_counter()))
            return len(stamps) - 1, stamps[-1] - stamps[0]

        def decode_blocks():
            cache = KVCache(len(model.blocks))
            with torch.no_grad(), autocast:
                blocks(torch.randn(1, prompt, d, device=device), cache)
                steps = [torch.randn(1, 1, d, device=device) for _ in range(new)]
                return new, seconds_of(lambda: [blocks(x, cache) for x in steps])
        return decode_whole if part == "whole" else decode_blocks

    seq, batch = sizes["train"], config.train.micro_batch_size
    data = torch.randint(vocab, (batch, seq + 1), device=device)
    hidden = torch.randn(batch, seq, d, device=device)
    step_tokens = config.train.global_batch_size * seq

    def forward_backward():
        with autocast:
            loss = (lm_loss(model(data[:, :-1]), data[:, 1:]) if part == "whole"
                    else blocks(hidden).float().square().mean())
        loss.backward()

    def train():
        """The global batch's tokens over its forward and backward passes (batch * seq tokens each) plus one
        optimizer step."""
        optimizer.zero_grad(set_to_none=True)         # the block stack's steps leave the other parameters be
        passes = seconds_of(forward_backward)
        update = seconds_of(optimizer.step)
        train.parts = {"fwdbwd_tokens_per_sec": batch * seq / passes, "optimizer_ms": update * 1e3}
        return step_tokens, passes * step_tokens / (batch * seq) + update
    return train


def built_with_optimizer(entry: tuple, sizes: dict, device: torch.device) -> tuple:
    model, config = build(*entry_build_args(entry), sizes, device)
    return model, config, torch.optim.AdamW(model.parameters(), lr=1e-5)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def macs_per_token(config, part: str, phase: str, sizes: dict) -> int:
    from megamem.flops import flops_report

    seq = sizes["prompt"] + sizes["new"] if phase == "decode" else sizes[phase]
    report = flops_report(config, seq)
    if part == "whole":
        return report["model"]["macs_per_token"]
    return report["num_layers"] * report["block"]["total_macs"] // seq


def peak_memory_gb(entry: tuple, part: str, phase: str, sizes: dict, device: torch.device, pool) -> float:
    """Run the phase twice on a reset CUDA allocator, or on CPU in a process of its own (resident memory cannot
    be told apart within one); the peak above what was in use before the model was built."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run = workload(*built_with_optimizer(entry, sizes, device), part, phase, sizes, device)
        run(), run()
        del run
        return round((torch.cuda.max_memory_allocated() - before) / 1e9, 4)
    try:
        return pool.submit(cpu_peak_memory_gb, entry, part, phase, sizes).result()
    except BrokenProcessPool:
        sys.exit(f"train_throughput: the process measuring the peak memory of {entry[1]} {part} {phase} died "
                 f"(killed for memory? see dmesg). Fix: free memory, or leave out --models/--kernels")


def cpu_peak_memory_gb(entry: tuple, part: str, phase: str, sizes: dict) -> float:
    """In a fresh process forked from a server that holds no model: the peak resident set (VmHWM) above the
    resident set before the model is built. A first pass, thrown away, loads what any first use loads (modules,
    thread pools, the CPU kernel's library), which is then reset out of the peak."""
    def phase_twice():
        run = workload(*built_with_optimizer(entry, sizes, torch.device("cpu")), part, phase, sizes,
                       torch.device("cpu"))
        run(), run()

    phase_twice()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)                   # its freed memory back to the system, to be counted
    Path("/proc/self/clear_refs").write_text("5")             # VmHWM := VmRSS (Linux)
    before = psutil.Process().memory_info().rss
    phase_twice()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round((int(line.split()[1]) * 1024 - before) / 1e9, 4)
    raise RuntimeError("no VmHWM in /proc/self/status: CPU peak memory is measured on Linux only")


def entry_build_args(entry: tuple) -> tuple:
    """(config name, overrides, kernel) of an entry (pair, model name, config name, overrides, arch, kernel)."""
    _, _, config_name, overrides, _, kernel = entry
    return config_name, list(overrides), kernel if kernel != "-" else "reference"


def in_turns(workloads: dict, repeats: int) -> dict:
    """Best tokens/s of each workload over `repeats` rounds, every workload once per round, with the parts of
    that best round a workload reports (its `parts`)."""
    for run in workloads.values():
        run()
    best = {key: (0.0, {}) for key in workloads}
    for _ in range(repeats):
        for key, run in workloads.items():
            tokens, seconds = run()
            if tokens / seconds > best[key][0]:
                best[key] = (tokens / seconds, dict(getattr(run, "parts", {})))
    return best


def profile(run, device: torch.device, top: int = 12) -> list[list]:
    """[op, self milliseconds, share of the whole] of one run's costliest ops (autograd nodes name the backward
    of each forward op; the fused CPU kernel's appear as _HashBackward / _GatherSumBackward)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as recorded:
        run()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(recorded.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) or 1
    return [[e.key, round(getattr(e, key) / 1e3, 2), round(getattr(e, key) / total, 3)] for e in events[:top]]


def summarise(rows: list[dict], device: str) -> dict:
    by = {(r["pair"], r["arch"], r["kernel"], r["part"], r["phase"]): r for r in rows}
    summary = {}
    for pair in dict.fromkeys(r["pair"] for r in rows):
        for kernel in dict.fromkeys(r["kernel"] for r in rows if r["arch"] == "memoryformer"):
            entry = {}
            for part in PARTS:
                for phase in PHASES:
                    mf, dense = by[(pair, "memoryformer", kernel, part, phase)], by[(pair, "dense", "-", part, phase)]
                    entry[f"{part}/{phase}"] = round(mf["tokens_per_sec"] / dense["tokens_per_sec"], 2)
            for arch, kernel_of in (("memoryformer", kernel), ("dense", "-")):
                whole, blocks = by[(pair, arch, kernel_of, "whole", "prefill512")], by[(pair, arch, kernel_of, "blocks",
                                                                                    "prefill512")]
                entry[f"{arch}_outside_blocks_prefill512_time_fraction"] = round(
                    1 - whole["tokens_per_sec"] / blocks["tokens_per_sec"], 3)
                entry[f"{arch}_outside_blocks_macs_fraction"] = round(
                    1 - blocks["macs_per_token"] / whole["macs_per_token"], 3)
            if device == "cpu":
                entry["targets_met"] = {phase: entry[f"blocks/{phase}"] >= target for phase, target in TARGETS.items()}
            summary[f"{pair}/{kernel}"] = entry
    return summary


def draw(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys((r["model"], r["kernel"]) for r in rows))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(models)
    for axis, part in zip(axes, PARTS, strict=True):
        for index, (model, kernel) in enumerate(models):
            values = [next(r["tokens_per_sec"] for r in rows if (r["model"], r["kernel"], r["part"], r["phase"]) ==
                           (model, kernel, part, phase)) for phase in PHASES]
            label = model if kernel == "-" else f"{model} ({kernel} kernel)"
            axis.bar([p + index * width for p in range(len(PHASES))], values, width, label=label)
        axis.set_xticks([p + width * (len(models) - 1) / 2 for p in range(len(PHASES))], PHASES)
        axis.set_yscale("log")
        axis.set_title("block stack" if part == "blocks" else "whole model (embedding and head too)")
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("tokens / s (log)")
    axes[1].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    from megamem.training.huge_pages import prefer_huge_pages

    prefer_huge_pages()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", default="tiny", help="comma-separated pairs: tiny (MF-tiny / Pythia-70M), small")
    parser.add_argument("--kernels", default="auto", help="Memory Layer kernels to run MemoryFormer on, e.g. "
                                                          "auto,reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short sequences and one repeat (a smoke test)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--png", help="and a bar chart here")
    parser.add_argument("--profile", metavar="PART/PHASE", help="also profile one run of PART/PHASE (e.g. "
                                                               "blocks/train) of each model: its top ops")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("train_throughput: --device cuda, but torch sees no CUDA device. Fix: run with --device cpu")
    sizes = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    kernels = [k.strip() for k in args.kernels.split(",")]
    entries = []                        # (pair, model name, config name, overrides, arch, kernel)
    for pair in ["smoke"] if args.quick else [p.strip() for p in args.models.split(",")]:
        (mf_name, mf_config, mf_overrides), (dense_name, dense_config, dense_overrides) = PAIRS[pair]
        entries += [(pair, mf_name, mf_config, mf_overrides, "memoryformer", kernel) for kernel in kernels]
        entries.append((pair, dense_name, dense_config, dense_overrides, "dense", "-"))
    # CPU peak memory: each measurement in a process forked from this server, started before any model exists
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "megamem.model", "megamem.inference.generate", "megamem.kernels"])
    pool = ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) if device.type == "cpu" else None
    if pool:
        pool.submit(psutil.cpu_count).result()                # starts the server now, while this process is small
    torch.manual_seed(0)
    built = {entry: built_with_optimizer(entry, sizes, device) for entry in entries}
    rows = []
    for phase in PHASES:                # one phase at a time, every model and part in turns
        workloads = {(entry, part): workload(*built[entry], part, phase, sizes, device)
                     for entry in entries for part in PARTS}
        for (entry, part), (rate, parts) in in_turns(workloads, repeats).items():
            pair, name, _, _, arch, kernel = entry
            rows.append({"model": name, "pair": pair, "arch": arch, "kernel": kernel, "part": part, "phase": phase,
                         "tokens_per_sec": round(rate, 1),
                         "macs_per_token": macs_per_token(built[entry][1], part, phase, sizes),
                         **{key: round(value, 1) for key, value in parts.items()}})
        print(f"  {phase} timed", file=sys.stderr)
    profiles = {entry[1]: profile(workload(*built[entry], part, phase, sizes, device), device)
                for entry in entries for part, phase in [args.profile.split("/")]} if args.profile else {}
    del built, workloads
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)                   # room for the memory measurements' processes
    for row in rows:
        entry = next(e for e in entries if (e[1], e[5]) == (row["model"], row["kernel"]))
        row["peak_mem_gb"] = peak_memory_gb(entry, row["part"], row["phase"], sizes, device, pool)
    if pool:
        pool.shutdown()
    result = {"device": args.device, "dtype": "fp32" if device.type == "cpu" else "bf16",
              "threads": torch.get_num_threads(), "quick": args.quick, "sizes": sizes, "rows": rows,
              "summary": summarise(rows, args.device), "targets_blocks_mf_over_dense_cpu": TARGETS,
              **({"profile": {"of": args.profile, "ops": profiles}} if profiles else {})}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.png:
        draw(rows, Path(args.png), f"{args.device}, {result['dtype']}, {result['threads']} threads")
    print(f"\n{args.device}, {result['dtype']}, {result['threads']} threads; prefill in batches of "
          f"{sizes['batch_tokens']} tokens, decode {sizes['prompt']} + {sizes['new']}, train seq {sizes['train']} "
          f"(micro-batches of train.micro_batch_size sequences, a step of train.global_batch_size)")
    print(f"{'model':<13}{'kernel':<11}{'part':<8}{'phase':<13}{'tokens/s':>12}{'MACs/token':>14}{'peak GB':>9}"
          f"{'  train: fwd+bwd tokens/s, AdamW ms':>36}")
    for r in rows:
        train = f"{r['fwdbwd_tokens_per_sec']:>20,.1f}{r['optimizer_ms']:>12,.1f}" if r["phase"] == "train" else ""
        print(f"{r['model']:<13}{r['kernel']:<11}{r['part']:<8}{r['phase']:<13}{r['tokens_per_sec']:>12,.1f}"
              f"{r['macs_per_token']:>14,}{r['peak_mem_gb']:>9.3f}{train}")
    for model, ops in profiles.items():
        print(f"\n{model}, {args.profile}, one run: " + ", ".join(f"{op} {ms:.0f} ms ({share:.0%})"
                                                                 for op, ms, share in ops))
    for key, entry in result["summary"].items():
        ratios = ", ".join(f"{name} x{value}" for name, value in entry.items() if "/" in name)
        print(f"{key} MemoryFormer over dense: {ratios}")
        met = entry.get("targets_met", {})
        if met:
            print(f"{key} targets (block stack): " + ", ".join(
                f"{phase} >= {TARGETS[phase]}x {'met' if ok else 'NOT met'}" for phase, ok in met.items()))


if __name__ == "__main__":
    main()
