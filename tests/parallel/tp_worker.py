"""Run by torchrun for the tests of tests/parallel: several scenarios in one launch, each on every rank.

    python -m torch.distributed.run --nproc_per_node N tests/parallel/tp_worker.py OUT_DIR CASE [CASE ...]

A CASE is `SCENARIO` or `SCENARIO:ARG,ARG`. Rank 0 writes each case's result to
OUT_DIR/CASE.json; a rank whose case raises writes the traceback to
OUT_DIR/CASE.rankR.error and ends the launch (torchrun stops the other ranks),
so a failure names its case and the cases before it keep their results. One
launch per world size pays the ranks' start-up once for every case.

Each scenario computes the single-process answer on every rank (same seed, same
inputs) and the tensor-parallel one, and reports the largest differences; the
test decides what is close enough.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from megamem.checkpoint.read import join_tensor_parallel
from megamem.config import load_config
from megamem.kernels import get_kernel
from megamem.model import build_model, lm_loss
from megamem.model.init import materialize
from megamem.model.memory_layer import MemoryLayer
from megamem.parallel import mappings, memoryformer_tp, traffic
from megamem.parallel.hashed_exchange import gather_hashed, route_hashed
from megamem.parallel.parallelize import parallelize
from megamem.parallel.sharding import shard_parameter, shard_records
from megamem.parallel.state import ParallelState
from tests.paths import CONFIGS

SMALL = ["model.hidden_size=64", "model.num_heads=4", "model.num_layers=2", "model.seq_len=32", "model.vocab_size=97",
         "train.precision=fp32"]


def worst(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Largest absolute difference, and relative to the larger magnitude of b."""
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return {"abs": diff, "scale": b.double().abs().max().item() if b.numel() else 0.0,
            "shape_equal": tuple(a.shape) == tuple(b.shape)}


def gather_dim(x: torch.Tensor, dim: int, state: ParallelState) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(state.tp)]
    dist.all_gather(parts, x.contiguous(), group=state.group("tp"))
    return torch.cat(parts, dim)


def local(x: torch.Tensor, dim: int, state: ParallelState) -> torch.Tensor:
    return x.chunk(state.tp, dim)[state.tp_rank]


def collectives(state: ParallelState, _args) -> dict:
    """Each autograd collective against the single-process computation it stands for, forward and backward.

    The ranks together compute one loss, L = sum(whole * weight): rank r holds
    its part of the input and weighs its part of the output (a share c_r of it
    where every rank holds the whole output). Each rank's input gradient must
    then be its part of dL/d(input).
    """
    tp, r = state.tensor_parallel, state.tp_rank
    torch.manual_seed(0)
    whole = torch.randn(3, 4 * state.tp, 8 * state.tp, dtype=torch.float64)      # the same on every rank
    weight = torch.randn_like(whole)
    share = (r + 1) / (state.tp * (state.tp + 1) / 2)                           # the c_r add up to 1
    cases = {   # name: (collective, this rank's input, expected output, output weight, expected input gradient)
        "all_gather": (lambda x: mappings.all_gather(x, 1, tp), local(whole, 1, state), whole, weight * share,
                       local(weight, 1, state)),
        "reduce_scatter": (lambda x: mappings.reduce_scatter(x, 2, tp), whole * share, local(whole, 2, state),
                           local(weight, 2, state), weight),
        "all_to_all": (lambda x: mappings.all_to_all(x, 1, 2, tp), local(whole, 2, state), local(whole, 1, state),
                       local(weight, 1, state), local(weight, 2, state)),
        "all_reduce": (lambda x: mappings.all_reduce(x, tp), whole * share, whole, weight * share, weight),
    }
    out = {}
    for name, (collective, x, expected, out_weight, expected_grad) in cases.items():
        x = x.clone().requires_grad_()
        y = collective(x)
        (y * out_weight).sum().backward()
        out[name] = {"forward": worst(y, expected), "backward": worst(x.grad, expected_grad)}
    w = torch.randn(8 * state.tp, dtype=torch.float64).requires_grad_()        # replicated, used on local tokens
    (mappings.replicated_grad(w, tp) * local(whole, 1, state)).sum().backward()
    out["replicated_grad"] = {"backward": worst(w.grad, whole.sum((0, 1)))}
    return out


def layer(state: ParallelState, args) -> dict:
    """One Memory Layer split by columns or by tables: output and every gradient at full shape, codes and p bitwise."""
    layout, kernel = args
    tp = state.tensor_parallel
    torch.manual_seed(1)
    plain = MemoryLayer(64, 48, tau=8, kernel=get_kernel(kernel), bias=True)
    x = torch.randn(2, 16, 64)
    grad_y = torch.randn(2, 16, 48)
    x_plain = x.clone().requires_grad_()
    y_plain = plain(x_plain)
    (y_plain * grad_y).sum().backward()

    sharded = MemoryLayer(64, 48, tau=8, kernel=get_kernel(kernel), bias=True)
    sharded.load_state_dict(plain.state_dict())
    x_local = local(x, 1, state).clone().requires_grad_()
    codes_ref, p_ref = get_kernel(kernel).hash(x, 8, 1.0, "paper")          # what one process computes
    if layout == "column":
        shard_parameter(sharded, "tables", 2, tp)
        shard_parameter(sharded, "bias", 0, tp)
        hashed = gather_hashed(sharded.hash(x_local), 1, 8, tp, "fp32")
        y_mine = sharded(None, hashed)                                     # [B, S, d_out / tp]
        y = gather_dim(y_mine.detach(), 2, state)
        (y_mine * local(grad_y, 2, state)).sum().backward()
        grads = {"tables": gather_dim(sharded.tables.grad, 2, state), "bias": gather_dim(sharded.bias.grad, 0, state)}
        codes_seen, p_seen = hashed
        codes_expected, p_expected = codes_ref, p_ref
    else:
        shard_parameter(sharded, "tables", 0, tp)
        hashed = route_hashed(sharded.hash(x_local), 1, 8, tp, "fp32")
        part = sharded(None, hashed, with_bias=False)
        y_local = mappings.reduce_scatter(part, 1, tp) + mappings.replicated_grad(sharded.bias, tp)
        y = gather_dim(y_local.detach(), 1, state)
        (y_local * local(grad_y, 1, state)).sum().backward()
        grads = {"tables": gather_dim(sharded.tables.grad, 0, state), "bias": sharded.bias.grad}
        codes_seen, p_seen = hashed
        codes_expected, p_expected = local(codes_ref, 2, state), local(p_ref, 2, state)
    bitwise = {"codes": bool(torch.equal(codes_seen.long(), codes_expected.long())),
               "p": bool(torch.equal(p_seen, p_expected))}
    flags = torch.tensor([bitwise["codes"], bitwise["p"]], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=state.group("tp"))
    return {"y": worst(y, y_plain.detach()), "x": worst(gather_dim(x_local.grad, 1, state), x_plain.grad),
            "tables": worst(grads["tables"], plain.tables.grad), "bias": worst(grads["bias"], plain.bias.grad),
            "codes_bitwise_all_ranks": bool(flags[0]), "p_bitwise_all_ranks": bool(flags[1])}


def model(state: ParallelState, args) -> dict:
    """The whole model at tp against one process: initial weights, logits, loss and every gradient."""
    arch, layout, p_dtype, norm3 = args
    overrides = [*SMALL, f"model.arch={arch}", f"parallel.table_sharding={layout}", f"parallel.p_dtype={p_dtype}",
                 "model.memory_bias=true", f"model.norm3={norm3}"]
    single = build_model(load_config([CONFIGS / "cpu-smoke.yaml"], overrides))
    config = load_config([CONFIGS / "cpu-smoke.yaml"], [*overrides, f"parallel.tp={state.tp}"])
    sharded = build_model(config, device="meta")
    loss_fn = parallelize(sharded, config, state)
    materialize(sharded, "cpu", config.run.seed)

    torch.manual_seed(2)
    tokens = torch.randint(0, 97, (2, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hashed_single = []                 # codes of every hashing of the one-process model, in order
    for layer in single.modules():
        if isinstance(layer, MemoryLayer):
            layer.observer = lambda _layer, codes, _p, _first: hashed_single.append(codes)
    logits_single = single(inputs)
    loss_single = lm_loss(logits_single, targets)
    loss_single.backward()
    exchanged = []                     # the codes each rank looks up, after the exchange of hashed chunks
    exchange = "gather_hashed" if layout == "column" else "route_hashed"
    original = getattr(memoryformer_tp, exchange)
    setattr(memoryformer_tp, exchange, lambda *a: exchanged.append(original(*a)) or exchanged[-1])
    logits_local = sharded(inputs)
    setattr(memoryformer_tp, exchange, original)
    loss = loss_fn(logits_local, targets)
    loss.backward()
    logits = gather_dim(logits_local.detach(), -1, state)[..., :97]
    # Q, K and V share one hashing: the one-process model hashes once for them, then ML1, then ML2, per block
    expected = [local(codes, 2, state) if layout == "table" else codes for codes in hashed_single]
    codes_equal = len(exchanged) == len(expected) and all(
        torch.equal(got.long(), want.long()) for (got, _), want in zip(exchanged, expected, strict=True))

    parts = shard_records(sharded)
    every = [None] * state.tp
    mine = {name: (param.detach(), param.grad) for name, param in sharded.named_parameters()}
    dist.all_gather_object(every, mine, group=state.group("tp"))
    weights = join_tensor_parallel([{n: w for n, (w, _) in rank.items()} for rank in every], parts)
    grads = join_tensor_parallel([{n: g for n, (_, g) in rank.items()} for rank in every], parts)
    out = {"logits": worst(logits, logits_single.detach()), "loss": worst(loss.detach(), loss_single.detach()),
           "weights": {}, "grads": {}, "exchanges": len(exchanged), "codes_equal_one_process": codes_equal}
    for name, param in single.named_parameters():
        rows = param.shape[0]
        out["weights"][name] = worst(weights[name][:rows], param.detach())
        out["grads"][name] = worst(grads[name][:rows], param.grad)
    return out


BYTE_CASES = [("memoryformer", "column", "fp32", False), ("memoryformer", "column", "fp16", False),
              ("memoryformer", "table", "fp32", True), ("memoryformer", "table", "fp16", False),
              ("dense", "column", "fp32", False)]


def block_bytes(state: ParallelState, _args) -> list[dict]:
    """Bytes one block moves forward and backward, counted, next to megamem.parallel.traffic's formula."""
    out = []
    for arch, layout, p_dtype, bias in BYTE_CASES:
        config = load_config([CONFIGS / "cpu-smoke.yaml"], [
            *SMALL, f"model.arch={arch}", f"parallel.tp={state.tp}", f"parallel.table_sharding={layout}",
            f"parallel.p_dtype={p_dtype}", f"model.memory_bias={str(bias).lower()}", "model.norm2=layernorm"])
        model = build_model(config, device="meta")
        parallelize(model, config, state)
        materialize(model, "cpu", 0)
        batch, m = 3, config.model
        x = torch.randn(batch, m.seq_len // state.tp, m.hidden_size, requires_grad=True)
        counter = state.tensor_parallel.counter
        counter.reset()
        y = model.blocks[0](x)
        y.backward(torch.randn_like(y))
        tokens = batch * m.seq_len
        formula = (traffic.memoryformer_block(m, state.tp, layout, p_dtype, 4, tokens) if arch == "memoryformer"
                   else traffic.pythia_block(m, state.tp, 4, tokens))
        out.append({"case": [arch, layout, p_dtype, bias], "forward": counter.total("forward"),
                    "backward": counter.total("backward"), "formula_forward": formula.forward,
                    "formula_backward": formula.backward})
    return out


ALLOCATION_CASES = [[], ["parallel.table_sharding=table", "model.memory_bias=true"], ["model.arch=dense"],
                    ["model.tie_embeddings=true", "model.norm3=rmsnorm"]]


def allocation(state: ParallelState, _args) -> list[dict]:
    """What each rank holds after building as training does: parameters and table values, per case and rank."""
    out = []
    for overrides in ALLOCATION_CASES:
        config = load_config([CONFIGS / "cpu-smoke.yaml"], [*SMALL, *overrides, f"parallel.tp={state.tp}"])
        model = build_model(config, device="meta")
        parallelize(model, config, state)
        materialize(model, "cpu", 0)
        mine = torch.tensor([sum(p.numel() for p in model.parameters()),
                             sum(p.numel() for n, p in model.named_parameters() if n.endswith(".tables"))])
        every = [torch.empty_like(mine) for _ in range(state.tp)]
        dist.all_gather(every, mine, group=state.group("tp"))
        out.append({"overrides": [*SMALL, *overrides], "params": [int(t[0]) for t in every],
                    "tables": [int(t[1]) for t in every]})
    return out


def pipeline_allocation(world: ParallelState, args) -> list[dict]:
    """Parameters and table values each rank of a tp x pp layout holds after building its pipeline stage as
    training does, for both models (args: tp, pp)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from megamem.parallel.pipeline import pipeline_module
    from megamem.training.run import unlink_shared_memory_buffers

    deepspeed.init_distributed(dist_backend="gloo")
    unlink_shared_memory_buffers(world.rank)
    tp, pp = int(args[0]), int(args[1])
    state = ParallelState.for_world(tp, pp, world.world_size, world.rank)
    state.build_groups()
    out = []
    for overrides in (["model.num_layers=4"], ["model.num_layers=3", "model.arch=dense"]):
        overrides = [*SMALL, *overrides, f"parallel.tp={tp}", f"parallel.pp={pp}"]
        config = load_config([CONFIGS / "cpu-smoke.yaml"], overrides)
        model = build_model(config, device="meta")
        loss_fn = parallelize(model, config, state)
        pipe = pipeline_module(model, config, state, loss_fn, torch.device("cpu"))
        assert not any(p.is_meta for p in pipe.parameters())
        mine = torch.tensor([sum(p.numel() for p in pipe.parameters()),
                             sum(p.numel() for n, p in pipe.named_parameters() if n.endswith(".tables"))])
        every = [torch.empty_like(mine) for _ in range(state.world_size)]
        dist.all_gather(every, mine)
        out.append({"overrides": overrides, "params": [int(t[0]) for t in every],
                    "tables": [int(t[1]) for t in every], "stage_of_rank": [r // (tp * state.dp)
                                                                           for r in range(state.world_size)]})
    return out


def memory(world: ParallelState, args) -> dict:
    """What one training step of cpu-smoke (fp32, ZeRO 0, micro-batch 4, the config's kernel) holds on a rank of
    tp = args[0], built as training builds it under DeepSpeed's engine, counted in tensor bytes where each part
    peaks: the parameters, their gradients after backward, the optimizer's state after its step, and the storage
    autograd keeps for backward at the end of the forward (each storage once, parameters apart)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from megamem.parallel.deepspeed_mpu import DeepSpeedMPU
    from megamem.training.deepspeed_config import deepspeed_config
    from megamem.training.optimizer import build_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    tp = int(args[0])
    state = ParallelState.for_world(tp, 1, world.world_size, world.rank)
    state.build_groups()
    overrides = [f"parallel.tp={tp}", "parallel.zero_stage=0", "train.precision=fp32",
                 f"train.global_batch_size={4 * state.dp}"]
    config = load_config([CONFIGS / "cpu-smoke.yaml"], overrides)
    model = build_model(config, device="meta")
    loss_fn = parallelize(model, config, state)
    materialize(model, "cpu", config.run.seed)
    optimizer = build_optimizer(model, config.optimizer, steps_itself=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config, state.dp),
                                      mpu=DeepSpeedMPU(state))
    parameters = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    kept = {}                           # storage -> bytes: a tensor saved by several ops is kept once

    def count(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(3)
    tokens = torch.randint(0, 257, (4, config.model.seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        loss = loss_fn(engine(tokens[:, :-1]), tokens[:, 1:])
    engine.backward(loss)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters() if p.grad is not None)
    engine.step()
    optimizer_state = sum(t.numel() * t.element_size() for s in engine.optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    weights = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    return {"overrides": overrides, "dp": state.dp,
            "bytes": {"weights": weights, "gradients": gradients, "optimizer_state": optimizer_state,
                      "activations": sum(kept.values())}}


def batch_check(state: ParallelState, _args) -> dict:
    """assert_same_batch passes equal batches and stops different ones, on every rank alike."""
    from megamem.errors import MegamemError
    from megamem.parallel.replica_checks import assert_same_batch

    same = torch.arange(24).reshape(2, 12)
    assert_same_batch(same, state)
    try:
        assert_same_batch(same + (state.tp_rank == 1), state)
    except MegamemError as err:
        return {"refused": str(err)}
    return {"refused": None}


SCENARIOS = {"collectives": collectives, "layer": layer, "model": model, "block_bytes": block_bytes,
             "allocation": allocation, "pipeline_allocation": pipeline_allocation, "memory": memory,
             "batch_check": batch_check}


def case_name(scenario: str, args: tuple[str, ...] = ()) -> str:
    return ":".join([scenario, ",".join(args)]) if args else scenario


def main() -> None:
    out_dir, *cases = sys.argv[1:]
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    state = ParallelState.for_world(world, 1, world, dist.get_rank())
    state.build_groups()
    for case in cases:
        scenario, _, args = case.partition(":")
        try:
            result = SCENARIOS[scenario](state, args.split(",") if args else [])
        except Exception:           # noqa: BLE001 -- reported by name; the peers cannot go on without this rank
            (Path(out_dir) / f"{case}.rank{dist.get_rank()}.error").write_text(traceback.format_exc())
            sys.stderr.flush()
            os._exit(1)
        if dist.get_rank() == 0:
            (Path(out_dir) / f"{case}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
