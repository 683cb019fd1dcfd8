"""The typed configuration tree of a megamem run.

Each section is a small dataclass, and each component is handed only its own
section. Field names are part of the user interface (scripts and docs refer to
them by dotted path, e.g. `model.hidden_size`), so renaming one is a breaking
change. Defaults follow the MemoryFormer paper and the Pythia recipe it trains
with (docs/model.md lists megamem's choices where the paper leaves one open).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

NormKind = Literal["rmsnorm", "layernorm"]


@dataclass
class ModelConfig:
    """Architecture. `arch: dense` is the Pythia / GPT-NeoX baseline."""

    arch: Literal["memoryformer", "dense"] = "memoryformer"
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    vocab_size: int = 50277
    seq_len: int = 2048
    # Memory Layers (docs/model.md, "The Memory Layer").
    tau: int = 8
    expanding_bits: int = 2
    temperature: float = 1.0
    weighting: Literal["paper", "l1"] = "l1"     # the one that needs no table LR of its own: docs/model.md
    memory_bias: bool = False
    table_init_std: float = 0.02
    qkv_table_init: Literal["normal", "released"] = "normal"
    memory_block_gelu: bool = False
    kernel: str = "auto"           # auto | reference | cpu | triton (megamem.kernels); auto: the fastest here
    # Norms: the released MemoryFormer code uses RMSNorm, RMSNorm, LayerNorm.
    norm1: NormKind = "rmsnorm"
    norm2: NormKind = "rmsnorm"
    norm3: NormKind = "layernorm"
    final_norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    # Attention.
    rotary_fraction: float = 0.25
    rotary_base: float = 10000.0
    # Dense baseline only.
    ffn_multiplier: int = 4
    # Embeddings and head.
    tie_embeddings: bool = False
    vocab_pad_multiple: int = 128
    init_std: float = 0.02


@dataclass
class DataSource:
    """One dataset of a blend: a directory of shards and its sampling weight."""

    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    """One dataset (`path`) or a weighted blend (`sources`), each a megamem preprocess output.

    `tokenizer` must be the one the data was made with ("byte" or a tokenizer.json):
    training checks its hash against every manifest.
    """

    path: str | None = None
    sources: list[DataSource] = field(default_factory=list)
    tokenizer: str = "byte"
    num_workers: int = 1


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    table_weight_decay: bool = True
    norm_weight_decay: bool = True
    table_lr_multiplier: float = 1.0
    offload: bool = False


@dataclass
class ScheduleConfig:
    """Cosine decay to `min_lr` after a linear warm-up of `warmup_fraction` of the steps."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = 0.01
    min_lr: float = 3e-4


@dataclass
class ParallelConfig:
    """Layout of a run (docs/parallel.md). `table_sharding`: how tensor parallelism splits a
    Memory Layer, by output columns (codes and p all-gathered; the default) or by whole tables (codes
    and p routed to each table's owner, partial sums reduce-scattered). `p_dtype`: the dtype p and its
    gradient travel in between ranks (computed in fp32 either way)."""

    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    table_sharding: Literal["column", "table"] = "column"
    p_dtype: Literal["fp32", "fp16"] = "fp32"


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8
    global_batch_size: int = 8
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    activation_checkpointing: bool = False
    eval_interval: int = 100
    eval_steps: int = 10          # validation micro-batches in all, shared out over data-parallel ranks
    # How long a rank waits in a collective (all-reduce, barrier, ...) for a peer that died or stalled before it
    # fails, so that the job ends instead of hanging (torch's default is 30 minutes for gloo, 10 for NCCL). Peers
    # wait in a barrier while one rank writes its checkpoint files: keep it above the slowest checkpoint save.
    collective_timeout_s: float = 600.0
    # A step whose gradients are not finite is skipped (DeepSpeed's overflow skip, also without fp16); this many
    # in a row stop the run, which has diverged.
    max_consecutive_skips: int = 20
    # 0: off. A factor f > 1: a step whose loss exceeds f x the mean of the previous steps' (up to 20, once 10 are
    # known) reloads the newest checkpoint's weights and optimizer state and goes on with the next batches, so the
    # batches since that checkpoint, the spike's among them, are skipped.
    spike_rollback: float = 0.0


@dataclass
class CheckpointConfig:
    """`on_write_error`: when a checkpoint cannot be written (a full disk), `continue` training and try again at the
    next interval, or `stop` the run (non-zero exit). The final and the preemption checkpoint always stop on it."""

    interval: int = 1000
    keep: int = 3
    on_write_error: Literal["continue", "stop"] = "continue"


@dataclass
class LoggingConfig:
    interval: int = 10
    histogram_interval: int = 100
    tensorboard: bool = True
    peak_tflops: float = 989.0


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 1234


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
