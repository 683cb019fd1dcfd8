"""Triton against the reference kernel at the layer shapes that ship: the output and every gradient.

For each layer of an MF-tiny / small / base block (QKV: d -> d; ML1: d -> (tau+2)K;
ML2: (tau+2)K -> d with tau+2 bits) at --tokens tokens, `l1` weighting (what the
configs ship), in fp32 and bf16: y, the input's gradient and the table gradients
of the Triton kernel against the reference kernel run in fp32 on the same
(upcast) inputs, as the largest absolute difference relative to the reference's
largest magnitude; and whether two runs give the same table gradients bit for
bit. Bounds: 1e-5 in fp32 (sums in another order), 2^-7 in bf16 (results
rounded to bf16, sums in fp32). On a GPU Triton is compiled; without one it runs
in Triton's interpreter (set TRITON_INTERPRET=1 first) on a few hundred tokens,
which is how the suite runs this script, while a repeat there cannot differ.

    python benchmarks/kernel_parity.py --device cuda --json out.json
    TRITON_INTERPRET=1 python benchmarks/kernel_parity.py --device cpu --models smoke --tokens 200
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from memory_layer import MODELS, layer_shapes  # the shapes benchmarks/memory_layer.py times, beside this file

BOUNDS = {"fp32": 1e-5, "bf16": 2**-7}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() / max(want.double().abs().max().item(), 1e-30)


def run(kernel, x, tables, bits: int, dy):
    """(y, dx, dtables) of one forward and backward, as fp32 tensors on the CPU."""
    x, tables = x.detach().clone().requires_grad_(), tables.detach().clone().requires_grad_()
    y = kernel.hash_gather_sum(x, tables, None, bits, 1.0, "l1")
    y.backward(dy.to(y.dtype))
    return tuple(t.detach().float().cpu() for t in (y, x.grad, tables.grad))


def compare(layer: str, d_in: int, d_out: int, bits: int, tokens: int, dtype: str, device: torch.device) -> dict:
    from megamem.kernels import get_kernel

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=generator)
    tables = torch.randn(d_in // bits, 2**bits, d_out, generator=generator) * 0.02
    dy = torch.randn(tokens, d_out, generator=generator)
    low = DTYPES[dtype]
    x, tables = x.to(low), tables.to(low)                  # the inputs both kernels see, in the row's precision
    triton = get_kernel("triton")
    ours = run(triton, x.to(device), tables.to(device), bits, dy.to(device))
    again = run(triton, x.to(device), tables.to(device), bits, dy.to(device))
    reference = run(get_kernel("reference"), x.float().to(device), tables.float().to(device), bits, dy.to(device))
    errors = {name: relative(a, b) for name, a, b in zip(("y", "dx", "dtables"), ours, reference, strict=True)}
    row = {"layer": layer, "d_in": d_in, "d_out": d_out, "bits": bits, "tokens": tokens, "dtype": dtype,
           **{f"{name}_error": round(value, 9) for name, value in errors.items()},
           "bound": BOUNDS[dtype], "repeat_bitwise": bool(torch.equal(ours[2], again[2]))}
    row["ok"] = all(value <= BOUNDS[dtype] for value in errors.values()) and row["repeat_bitwise"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--models", default="tiny,small,base", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [compare(layer, d_in, d_out, bits, args.tokens, dtype, device)
            for model in args.models.split(",") for layer, d_in, d_out, bits in layer_shapes(model.strip())
            for dtype in args.dtypes.split(",")]
    result = {"device": args.device, "tokens": args.tokens, "rows": rows, "all_ok": all(r["ok"] for r in rows)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'layer':<12}{'dtype':<6}{'y':>10}{'dx':>10}{'dtables':>10}{'bound':>10}  repeat  ok")
    for r in rows:
        print(f"{r['layer']:<12}{r['dtype']:<6}{r['y_error']:>10.1e}{r['dx_error']:>10.1e}{r['dtables_error']:>10.1e}"
              f"{r['bound']:>10.1e}  {'same' if r['repeat_bitwise'] else 'DIFFERS':<6}  {'ok' if r['ok'] else 'MISS'}")
    print(f"Triton against reference, {args.device}, {args.tokens} tokens: "
          f"{'every row within its bound' if result['all_ok'] else 'a row MISSES its bound'}")


if __name__ == "__main__":
    main()
