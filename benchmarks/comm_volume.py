"""Tensor-parallel traffic: bytes per token per block that one rank receives, forward and backward.

Layouts: MemoryFormer with tables split by columns (megamem's default) and by
whole tables, megamem's dense Pythia block (parallel residual), and Megatron's
sequential dense block with sequence parallelism (built here from the same
collectives, re-gathering its inputs in backward as Megatron does), each with the
hidden size of the MF-tiny / small / base shape. tp = 2 and 4 (--counted-tp) are
counted: one block's forward and backward in real gloo runs (bf16 activations,
CPU), the bytes handed to each collective as megamem.parallel.mappings' wrappers
count them (what a rank receives by the collective's own arithmetic, not bytes
seen on the wire), checked against megamem.parallel.traffic's formulas; the other
tp come from the same formulas. Also the
data-parallel gradient bytes per step a rank receives (bf16 gradients, ring
all-reduce over dp = 8; the tables dominate).

    python benchmarks/comm_volume.py [--json PATH] [--shapes tiny,small,base] [--seq-len 2048] [--counted-tp 2,4]

Prints a table, the ratios at tp = 8, and with --json writes
{"rows": [{"shape", "layout", "tp", "p_dtype", "fwd_bytes_per_token", "bwd_bytes_per_token", "source"}, ...],
 "dp_gradients": [...], "ratios": {...}}.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from megamem.config import ConfigError, load_config
from megamem.model import build_model
from megamem.model.init import materialize
from megamem.parallel import mappings, traffic
from megamem.parallel.dense_tp import ParallelResidualDenseBlock
from megamem.parallel.parallelize import parallelize
from megamem.parallel.state import ParallelState
from megamem.plan import plan_report
from megamem.ports import free_port

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": ("memoryformer-tiny", "pythia-70m"), "small": ("memoryformer-small", "pythia-160m"),
          "base": ("memoryformer-base", "pythia-410m")}
MEMORYFORMER = [("column", "fp32"), ("column", "fp16"), ("table", "fp32"), ("table", "fp16")]
ACT_BYTES = 2           # bf16 activations


class _GatherLinear(torch.autograd.Function):
    """Megatron's sequence-parallel column-parallel Linear: all-gather the local input, keep only the local
    input, and gather it again in backward for the weight gradient."""

    @staticmethod
    def forward(ctx, x_local, weight, bias, tp):
        ctx.save_for_backward(x_local, weight)
        ctx.tp = tp
        return F.linear(mappings.gather_tensor(x_local, mappings.SEQUENCE_DIM, tp, "forward"), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x_local, weight = ctx.saved_tensors
        whole = mappings.gather_tensor(x_local, mappings.SEQUENCE_DIM, ctx.tp, "backward")
        grad_x = mappings.reduce_scatter_tensor(grad @ weight, mappings.SEQUENCE_DIM, ctx.tp, "backward")
        grad_weight = grad.flatten(0, -2).t() @ whole.flatten(0, -2)
        return grad_x, grad_weight, grad.flatten(0, -2).sum(0), None


class MegatronSequentialBlock(ParallelResidualDenseBlock):
    """Y = Z + MLP(Norm2(Z)), Z = X + Attn(Norm1(X)), tensor- and sequence-parallel as in Megatron-LM: the same
    shards as megamem's dense block, a sequential residual, each branch gathering its own normed input."""

    def forward(self, x_BSd: torch.Tensor) -> torch.Tensor:
        tp, seq = self.tp, mappings.SEQUENCE_DIM
        q, k, v = _GatherLinear.apply(self.norm1(x_BSd), self.qkv.weight, self.qkv.bias, tp).chunk(3, dim=-1)
        z = x_BSd + mappings.reduce_scatter(self.out(self.attention(q, k, v)), seq, tp) \
            + mappings.replicated_grad(self.out.bias, tp)
        h = F.gelu(_GatherLinear.apply(self.norm2(z), self.fc1.weight, self.fc1.bias, tp))
        return z + mappings.reduce_scatter(self.fc2(h), seq, tp) + mappings.replicated_grad(self.fc2.bias, tp)


@functools.cache
def configs(shape: str, seq_len: int, tp: int) -> dict[str, object]:
    """One-block configs of the shape: the MemoryFormer and its dense baseline, bf16, this tp (read once; callers
    change them only through dataclasses.replace)."""
    memoryformer, dense = SHAPES[shape]
    common = ["model.num_layers=1", f"model.seq_len={seq_len}", f"parallel.tp={tp}", "train.precision=bf16"]
    return {"memoryformer": load_config([REPO / "configs" / f"{memoryformer}.yaml"], common),
            "dense": load_config([REPO / "configs" / f"{dense}.yaml"], common)}


def measure(state: ParallelState, shapes: list[str], seq_len: int) -> list[dict]:
    """Counted bytes of one block's forward and backward (one sequence), for every layout of every shape."""
    rows = []
    for shape in shapes:
        cfgs = configs(shape, seq_len, state.tp)
        cases = [("memoryformer", layout, p_dtype) for layout, p_dtype in MEMORYFORMER]
        cases += [("dense", "pythia", None), ("dense", "megatron", None)]
        for arch, layout, p_dtype in cases:
            config = cfgs[arch]
            if arch == "memoryformer":
                config = dataclasses.replace(config, parallel=dataclasses.replace(
                    config.parallel, table_sharding=layout, p_dtype=p_dtype))
            model = build_model(config, device="meta")
            if layout == "megatron":
                model = MegatronSequentialBlock(model.blocks[0], state.tensor_parallel)
                block = materialize(model, "cpu", 0)
            else:
                parallelize(model, config, state)
                block = model.blocks[0]              # its values only: the vocabulary's rows are most of the model
                materialize(model, "cpu", 0, parts=[block])
            block = block.to(torch.bfloat16)
            x = torch.randn(1, seq_len // state.tp, config.model.hidden_size, dtype=torch.bfloat16,
                            requires_grad=True)
            counter = state.tensor_parallel.counter
            counter.reset()
            y = block(x)
            y.backward(torch.randn_like(y))
            rows.append({"shape": shape, "layout": layout, "tp": state.tp, "p_dtype": p_dtype,
                         "fwd_bytes": counter.total("forward"), "bwd_bytes": counter.total("backward")})
            del model, block, x, y
    return rows


def formula(shape: str, layout: str, tp: int, p_dtype: str | None, seq_len: int) -> traffic.Traffic:
    cfgs = configs(shape, seq_len, 1)
    if layout in ("column", "table"):
        return traffic.memoryformer_block(cfgs["memoryformer"].model, tp, layout, p_dtype, ACT_BYTES, seq_len)
    if layout == "pythia":
        return traffic.pythia_block(cfgs["dense"].model, tp, ACT_BYTES, seq_len)
    return traffic.megatron_sequential_block(cfgs["dense"].model, tp, ACT_BYTES, seq_len)


def dp_gradient_bytes(shape: str, layout: str, tp: int, seq_len: int, dp: int = 8) -> dict:
    """Gradient bytes a rank receives per step in a ring all-reduce over dp ranks: 2 (dp-1)/dp of its gradients."""
    memoryformer, dense = SHAPES[shape]
    name = memoryformer if layout in ("column", "table") else dense
    overrides = [f"parallel.tp={tp}", f"model.seq_len={seq_len}"]
    if layout == "table":
        overrides.append("parallel.table_sharding=table")
    report = plan_report(load_config([REPO / "configs" / f"{name}.yaml"], overrides), tp, 1, dp, 1, 1, 80)
    params, tables = report["per_rank_params"], report["per_rank_table_params"]
    return {"shape": shape, "layout": layout, "tp": tp, "dp": dp, "params_per_rank": params,
            "grad_bytes_per_step": 2 * (dp - 1) * params * ACT_BYTES // dp,
            "table_fraction": tables / params}


def worker(out: str, shapes: list[str], seq_len: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    state = ParallelState.for_world(world, 1, world, dist.get_rank())
    state.build_groups()
    rows = measure(state, shapes, seq_len)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_counted(tp: int, shapes: list[str], seq_len: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_port",
                   str(free_port()), __file__, "--worker", str(out), "--shapes", ",".join(shapes),
                   "--seq-len", str(seq_len)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"comm_volume: the tp = {tp} run failed:\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())


def possible(shape: str, tp: int, seq_len: int) -> str | None:
    """None if both models of the shape can be split over tp ranks, else why not."""
    try:
        configs(shape, seq_len, tp)
    except ConfigError as err:
        return str(err).split(": ", 1)[-1]
    return None


def rows_for(shapes: list[str], seq_len: int, counted_tp: tuple[int, ...]) -> tuple[list[dict], list]:
    rows, skipped = [], []
    for tp in (2, 4, 8):
        fit = [shape for shape in shapes if possible(shape, tp, seq_len) is None]
        skipped += [{"shape": shape, "tp": tp, "why": possible(shape, tp, seq_len)} for shape in shapes
                    if shape not in fit]
        counted = {(r["shape"], r["layout"], r["p_dtype"]): r for r in run_counted(tp, fit, seq_len)} \
            if tp in counted_tp and fit else {}
        for shape in fit:
            for layout, p_dtype in [*MEMORYFORMER, ("pythia", None), ("megatron", None)]:
                expected = formula(shape, layout, tp, p_dtype, seq_len)
                row = {"shape": shape, "layout": layout, "tp": tp, "p_dtype": p_dtype,
                       "formula_fwd_bytes_per_token": expected.forward / seq_len,
                       "formula_bwd_bytes_per_token": expected.backward / seq_len}
                got = counted.get((shape, layout, p_dtype))
                if got:
                    row.update(fwd_bytes_per_token=got["fwd_bytes"] / seq_len,
                               bwd_bytes_per_token=got["bwd_bytes"] / seq_len, source="counted",
                               matches_formula=(got["fwd_bytes"], got["bwd_bytes"]) == (expected.forward,
                                                                                        expected.backward))
                else:
                    row.update(fwd_bytes_per_token=row["formula_fwd_bytes_per_token"],
                               bwd_bytes_per_token=row["formula_bwd_bytes_per_token"], source="formula")
                rows.append(row)
    return rows, skipped


def ratios(rows: list[dict], shape: str, tp: int = 8) -> dict:
    def total(layout, p_dtype=None):
        (row,) = [r for r in rows if (r["shape"], r["layout"], r["tp"], r["p_dtype"]) == (shape, layout, tp, p_dtype)]
        return row["fwd_bytes_per_token"] + row["bwd_bytes_per_token"]

    out = {}
    for layout, p_dtype in MEMORYFORMER:
        out[f"{layout}_{p_dtype}_vs_megatron"] = total(layout, p_dtype) / total("megatron")
        out[f"{layout}_{p_dtype}_vs_pythia"] = total(layout, p_dtype) / total("pythia")
    return out


def render(rows: list[dict], dp_rows: list[dict], ratio: dict, shape: str) -> str:
    lines = [f"{'shape':<6}{'layout':<10}{'tp':>3}{'p':>6}{'fwd B/token':>13}{'bwd B/token':>13}{'fwd+bwd':>10}"
             f"  source"]
    for r in rows:
        check = "" if r["source"] == "formula" else ("  = formula" if r["matches_formula"] else "  != FORMULA")
        lines.append(f"{r['shape']:<6}{r['layout']:<10}{r['tp']:>3}{r['p_dtype'] or '-':>6}"
                     f"{r['fwd_bytes_per_token']:>13,.1f}{r['bwd_bytes_per_token']:>13,.1f}"
                     f"{r['fwd_bytes_per_token'] + r['bwd_bytes_per_token']:>10,.0f}  {r['source']}{check}")
    lines.append(f"\nat tp = 8, {shape}, forward + backward bytes per token:")
    for key, value in ratio.items():
        lines.append(f"  {key:<28}{100 * value:6.1f}%")
    lines.append("\ndata-parallel gradients per step (bf16, ring all-reduce over dp = 8, largest tp), per rank:")
    for r in dp_rows:
        lines.append(f"  {r['shape']:<6}{r['layout']:<10}tp={r['tp']}  {r['grad_bytes_per_step'] / 2**30:8.2f} GiB"
                     f"  ({100 * r['table_fraction']:.0f}% of it tables)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--shapes", default="tiny,small,base")
    parser.add_argument("--seq-len", type=int, default=2048, help="positions of the one sequence counted")
    parser.add_argument("--counted-tp", default="2,4", help="the tp sizes run and counted (the rest: formulas)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.worker:
        worker(args.worker, shapes, args.seq_len)
        return
    rows, skipped = rows_for(shapes, args.seq_len, tuple(int(tp) for tp in args.counted_tp.split(",")))
    largest = shapes[-1]
    ratio = ratios(rows, largest)
    dp_rows = [dp_gradient_bytes(shape, layout, max(r["tp"] for r in rows if r["shape"] == shape), args.seq_len)
               for shape in shapes for layout in ("column", "table", "pythia")]
    print(render(rows, dp_rows, ratio, largest))
    for skip in skipped:
        print(f"{skip['shape']} at tp = {skip['tp']}: not possible ({skip['why']})")
    targets = {"column_fp32 <= 25% of megatron": ratio["column_fp32_vs_megatron"] <= 0.25,
               "column_fp16 <= 16% of megatron": ratio["column_fp16_vs_megatron"] <= 0.16}
    for name, met in targets.items():
        print(f"target {name} at tp = 8 ({largest}): {'met' if met else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seq_len": args.seq_len, "rows": rows, "skipped": skipped,
                                               "dp_gradients": dp_rows,
                                               "ratios": {largest: ratio}, "targets": targets}, indent=1))
    if not all(r.get("matches_formula", True) for r in rows):
        sys.exit("comm_volume: a counted row differs from its formula (marked != FORMULA above)")


if __name__ == "__main__":
    main()
