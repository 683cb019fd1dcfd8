"""Memory plan of a run: parameters and bytes per rank for a parallel layout.

How a user sizes a billion-parameter MemoryFormer before queueing it. Tables
dominate the parameters (docs/model.md, "Table sizes"), so the plan separates them from the
rest. Rules (docs/parallel.md, "Tensor parallelism" to "Data parallelism and ZeRO"):
- tensor parallelism splits parameters as megamem.parallel.parallelize does
  (the plan applies it to a meta model): tables by columns or by whole tables,
  Norm3 with ML1's columns, Linear weights, the embedding and the head; norms
  on the residual and biases added once stay whole on every rank;
- pipeline stages get contiguous blocks, the embedding on the first stage and
  final norm + head on the last (a tied embedding lives on both);
- ZeRO 1 splits optimizer state over dp, ZeRO 2 also gradients, ZeRO 3 also weights;
- mixed precision keeps 2-byte weights and gradients (4-byte gradients when
  pipelining in bf16, DeepSpeed's fp32 accumulation) plus a 12-byte fp32 master
  copy and Adam moments; fp32 keeps 4 + 4 + 8 bytes.
Activations are an estimate of what autograd keeps (listed in
`_block_activation_bytes_per_token`, for the fused kernels or the reference),
with sequence parallelism dividing them by tp and 1F1B keeping up to pp
micro-batches in flight on the first stage; tests/test_plan.py holds every part
to what a CPU training step holds.
"""
from __future__ import annotations

import dataclasses

from megamem.config.schema import Config
from megamem.config.validate import padded_vocab_size
from megamem.model.build import build_model
from megamem.parallel.parallelize import parallelize_as_rank
from megamem.parallel.pipeline_layout import blocks_per_stage, stage_of_block

GIB = 1024**3


@dataclasses.dataclass
class StageParams:
    tables: int = 0           # this rank's
    params: int = 0           # this rank's, tables included
    blocks: int = 0


def _stage_params(config: Config, tp: int, pp: int) -> tuple[list[StageParams], dict[str, int]]:
    """Parameters of tensor-parallel rank 0 on each stage, and of the whole model.

    The rank's shapes come from megamem.parallel.parallelize applied to a meta
    model, the very code a training rank runs, so the plan is what it allocates.
    """
    model = build_model(config, device="meta")
    whole = {"table_params": 0, "other_params": 0}
    for name, param in model.named_parameters():          # before splitting it
        whole["table_params" if name.endswith(".tables") else "other_params"] += param.numel()
    parallelize_as_rank(model, config, 0)
    counts = blocks_per_stage(len(model.blocks), pp)
    stages = [StageParams(blocks=n) for n in counts]
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith("embed."):
            stage = 0
        elif name.startswith("blocks."):
            stage = stage_of_block(int(name.split(".")[1]), counts)
        else:
            stage = pp - 1
        if name == "head.weight" and config.model.tie_embeddings and stage == 0:
            continue                              # one stage: the tied table once
        stages[stage].params += param.numel()
        if name.endswith(".tables"):
            stages[stage].tables += param.numel()
    return stages, whole


def _block_activation_bytes_per_token(config: Config, act_bytes: int) -> int:
    """Bytes autograd keeps per token and block, on the config's Memory Layer kernel."""
    m = config.model
    d = m.hidden_size
    if m.arch == "dense":
        return 17 * d * act_bytes          # Megatron's 34 s b h bytes at 2-byte activations, flash attention
    k = d // m.tau
    wide = (m.tau + m.expanding_bits) * k
    # norm1 in/out, q k v, rotated q k, attention out, norm2 in/out, ML1 out, norm3 out
    activations = (2 * d + 3 * d + 2 * d + d + 2 * d + 2 * wide) * act_bytes
    if m.kernel == "reference":
        # three hashings (inputs d, d, wide): fp32 |z| and log-sigmoid input, int64 codes, fp32 p and its cast
        hashing = 2 * 4 * (2 * d + wide) + 3 * k * (8 + 4 + act_bytes)
    else:
        # the fused kernels keep each chunk's code (at most 2 bytes) and fp32 p, and read the normed inputs above
        hashing = 3 * k * (2 + 4)
    return activations + hashing


def plan_report(config: Config, tp: int, pp: int, dp: int, zero: int, micro_batch: int, gpu_mem_gib: float) -> dict:
    """Parameters and bytes per rank of the layout; the config's parallel section is ignored for tp/pp/zero."""
    config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tp=tp, pp=pp, zero_stage=zero))
    stages, whole = _stage_params(config, tp, pp)
    precision = config.train.precision
    act_bytes = 4 if precision == "fp32" else 2
    weight_bytes, optim_bytes = (4, 8) if precision == "fp32" else (2, 12)
    grad_bytes = 4 if precision == "fp32" or pp > 1 else 2
    tokens = micro_batch * config.model.seq_len
    per_block = _block_activation_bytes_per_token(config, act_bytes)
    d = config.model.hidden_size
    vocab = config.model.vocab_size

    rows = []
    for index, stage in enumerate(stages):
        params = stage.params
        in_flight = pp - index                    # 1F1B: stage i holds pp - i micro-batches
        if config.train.activation_checkpointing:
            act = tokens * (stage.blocks * d * act_bytes + per_block) // tp
        else:
            act = tokens * stage.blocks * per_block // tp
        act *= in_flight
        if index == pp - 1:
            # logits and fp32 softmax
            act += tokens * padded_vocab_size(config.model, config.parallel) // tp * (act_bytes + 4)
        sizes = {
            "weights": params * weight_bytes // (dp if zero >= 3 else 1),
            "gradients": params * grad_bytes // (dp if zero >= 2 else 1),
            "optimizer_state": 0 if config.optimizer.offload else params * optim_bytes // (dp if zero >= 1 else 1),
            "activations": act,
        }
        sizes["total"] = sum(sizes.values())
        rows.append({"stage": index, "blocks": stage.blocks, "params": params,
                     "table_params": stage.tables, "bytes": sizes})
    worst = max(rows, key=lambda row: row["bytes"]["total"])
    return {
        "layout": {"tp": tp, "pp": pp, "dp": dp, "zero_stage": zero, "world_size": tp * pp * dp,
                   "micro_batch": micro_batch, "seq_len": config.model.seq_len, "precision": precision,
                   "activation_checkpointing": config.train.activation_checkpointing,
                   "optimizer_offload": config.optimizer.offload, "vocab_size": vocab,
                   "padded_vocab_size": padded_vocab_size(config.model, config.parallel)},
        "table_params": whole["table_params"],
        "other_params": whole["other_params"],
        "total_params": whole["table_params"] + whole["other_params"],
        "per_rank_params": worst["params"],
        "per_rank_table_params": worst["table_params"],
        "per_rank_bytes": worst["bytes"],
        "worst_stage": worst["stage"],
        "stages": rows,
        "gpu_mem_gib": gpu_mem_gib,
        "fits": worst["bytes"]["total"] <= gpu_mem_gib * GIB,
    }
