"""Cross-field rules of the config tree, checked once at load time.

Single-field types are checked while loading; this module holds every rule that
relates two or more fields (shapes the Memory Layer can take, parallel layouts
the tables can be sharded in, batch arithmetic), so that a run that cannot work
fails before it is queued rather than hours into it.
"""
from __future__ import annotations

from typing import Any

from megamem.config.errors import ConfigError
from megamem.config.schema import Config, ModelConfig, ParallelConfig
from megamem.config.sources import Sources

TAU_RANGE = (4, 12)


def validate(config: Config, sources: Sources | None = None) -> None:
    """Raise ConfigError naming the first broken rule, its source and the fix."""
    _Checker(config, sources if sources is not None else Sources()).run()


def validate_world(config: Config, world_size: int) -> int:
    """Check that `world_size` processes can host the layout; return the data-parallel size."""
    par, train = config.parallel, config.train
    model_parallel = par.tp * par.pp
    if world_size % model_parallel:
        raise ConfigError(
            f"{world_size} processes cannot host parallel.tp={par.tp} x parallel.pp={par.pp} = {model_parallel} "
            f"ranks per replica ({world_size} % {model_parallel} = {world_size % model_parallel}). "
            f"Fix: use a multiple of {model_parallel} processes, or change parallel.tp / parallel.pp")
    dp = world_size // model_parallel
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {dp} = {per_step} "
            f"(world {world_size} / (tp {par.tp} x pp {par.pp})). Fix: make global = micro x accumulation x {dp}")
    return dp


def num_chunks(model: ModelConfig) -> int:
    """K = hidden_size / tau, the number of hashed chunks per token (docs/model.md, "The Memory Layer")."""
    return model.hidden_size // model.tau


def padded_vocab_size(model: ModelConfig, parallel: ParallelConfig) -> int:
    """Vocabulary rounded up to vocab_pad_multiple x tp, as Megatron does, so the
    vocabulary-parallel embedding and head split evenly (docs/parallel.md, "Embedding and head")."""
    multiple = model.vocab_pad_multiple * parallel.tp
    return -(-model.vocab_size // multiple) * multiple


class _Checker:
    def __init__(self, config: Config, sources: Sources):
        self.config = config
        self.sources = sources

    def fail(self, keys: str | tuple[str, ...], problem: str, fix: str) -> None:
        keys = (keys,) if isinstance(keys, str) else keys
        where = sorted({self.sources.of(k) for k in keys})
        values = ", ".join(f"{k}={self._value(k)!r}" for k in keys)
        raise ConfigError(f"{' and '.join(where)}: {values}: {problem}. Fix: {fix}")

    def _value(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def run(self) -> None:
        self.model()
        self.parallel()
        self.training()
        self.data()

    def model(self) -> None:
        m = self.config.model
        positive = ("hidden_size", "num_layers", "num_heads", "vocab_size", "seq_len", "ffn_multiplier",
                    "vocab_pad_multiple")
        for name in positive:
            if getattr(m, name) <= 0:
                self.fail(f"model.{name}", "must be positive", f"set model.{name} to a positive integer")
        if m.arch == "memoryformer":
            low, high = TAU_RANGE
            if not low <= m.tau <= high:
                self.fail("model.tau", f"tau must lie in [{low}, {high}] (a table has 2^tau rows)",
                          "use tau = 8 as in the paper")
            if m.hidden_size % m.tau:
                self.fail(("model.hidden_size", "model.tau"),
                          "hidden_size must be a multiple of tau (each token is cut into tau-value chunks)",
                          f"use a hidden_size that is a multiple of {m.tau}, "
                          f"e.g. {(m.hidden_size // m.tau + 1) * m.tau}")
            if not 0 <= m.expanding_bits <= 4:
                self.fail("model.expanding_bits",
                          "must lie in [0, 4] (each bit doubles the Memory Block's second tables)",
                          "use 2 as in the paper")
            if m.tau + m.expanding_bits > 15:
                self.fail(("model.tau", "model.expanding_bits"),
                          "tau + expanding_bits must be at most 15 (ML2's codes are kept and sent as 16-bit signed "
                          "integers)", "lower expanding_bits or tau")
            if m.temperature <= 0:
                self.fail("model.temperature", "the softmax temperature must be positive", "use 1.0 (the default)")
            if m.weighting == "l1" and m.temperature != 1.0:
                self.fail(("model.weighting", "model.temperature"),
                          "the released code's l1 weighting fixes the temperature at 1",
                          "set model.temperature=1.0 or model.weighting=paper")
            if m.table_init_std <= 0:
                self.fail("model.table_init_std", "must be positive", "use 0.02 as in the paper")
            self._kernel()
        if m.hidden_size % m.num_heads:
            self.fail(("model.hidden_size", "model.num_heads"), "num_heads must divide hidden_size",
                      f"choose num_heads among the divisors of {m.hidden_size}")
        head_dim = m.hidden_size // m.num_heads
        rotary_dims = int(head_dim * m.rotary_fraction)
        if not 0.0 <= m.rotary_fraction <= 1.0 or rotary_dims % 2:
            self.fail("model.rotary_fraction",
                      f"rotary dims per head = int({head_dim} x fraction) = {rotary_dims} must be even, "
                      "fraction in [0, 1]",
                      "pick a fraction that gives an even number of dims, e.g. 0.25 with head_dim 64")
        if m.norm_eps <= 0:
            self.fail("model.norm_eps", "must be positive", "use 1e-5")

    def _kernel(self) -> None:
        from megamem.kernels import available_kernels

        names = available_kernels()
        if self.config.model.kernel not in names:
            self.fail("model.kernel", f"unknown Memory Layer kernel (available: {', '.join(names)})",
                      f"use one of {', '.join(names)}")

    def parallel(self) -> None:
        m, p = self.config.model, self.config.parallel
        for name in ("tp", "pp"):
            if getattr(p, name) < 1:
                self.fail(f"parallel.{name}", "must be at least 1", f"set parallel.{name}=1 to disable it")
        if p.zero_stage not in (0, 1, 2, 3):
            self.fail("parallel.zero_stage", "ZeRO stages are 0, 1, 2 and 3", "use 1 (optimizer state sharded)")
        if p.pp > 1 and p.zero_stage > 1:
            self.fail(("parallel.pp", "parallel.zero_stage"),
                      "DeepSpeed refuses ZeRO stage 2 or 3 with pipeline parallelism",
                      "use parallel.zero_stage=1 with pipelining, or parallel.pp=1")
        if p.pp > 1 and m.tie_embeddings:
            self.fail(("parallel.pp", "model.tie_embeddings"),
                      "a tied embedding and head would sit on the first and last pipeline stages",
                      "set model.tie_embeddings=false with pipelining, or parallel.pp=1")
        if p.pp > 1 and p.zero_stage == 0 and self.config.train.precision == "bf16":
            self.fail(("parallel.pp", "parallel.zero_stage", "train.precision"),
                      "DeepSpeed's bf16 optimizer without ZeRO cannot accumulate a pipeline's gradients in fp32",
                      "use parallel.zero_stage=1 for bf16 pipelining")
        if p.tp > 1 and p.zero_stage == 0 and self.config.train.precision != "fp32":
            self.fail(("parallel.tp", "parallel.zero_stage", "train.precision"),
                      "DeepSpeed's bf16/fp16 optimizer without ZeRO takes the gradient norm that clipping divides "
                      "by from tensor-parallel rank 0's gradients alone, leaving out the other ranks' shards",
                      "use parallel.zero_stage=1 (or 2, 3) for tensor parallelism in bf16 or fp16")
        if p.pp > m.num_layers:
            self.fail(("parallel.pp", "model.num_layers"), "more pipeline stages than blocks",
                      f"use parallel.pp <= {m.num_layers}")
        if m.num_heads % p.tp:
            self.fail(("parallel.tp", "model.num_heads"),
                      "tp must divide the number of heads (each rank owns whole heads)",
                      f"choose parallel.tp among the divisors of {m.num_heads}")
        if m.arch == "memoryformer" and m.hidden_size % m.tau == 0 and num_chunks(m) % p.tp:
            self.fail(("parallel.tp", "model.hidden_size", "model.tau"),
                      f"tp must divide K = hidden_size / tau = {num_chunks(m)}, the chunk count of every Memory "
                      "Layer (ML1's column slice is ML2's chunks; the table layout gives each rank K / tp tables)",
                      f"choose parallel.tp among the divisors of {num_chunks(m)}")
        if m.seq_len % p.tp:
            self.fail(("parallel.tp", "model.seq_len"),
                      "tp must divide the positions of a sequence (the sequence-parallel residual gives each "
                      "rank seq_len / tp of every sequence)",
                      f"choose parallel.tp among the divisors of {m.seq_len}, or a seq_len that tp divides")

    def training(self) -> None:
        t, o, s = self.config.train, self.config.optimizer, self.config.schedule
        c, lg = self.config.checkpoint, self.config.logging
        for name in ("steps", "micro_batch_size", "global_batch_size", "eval_interval", "eval_steps"):
            if getattr(t, name) <= 0:
                self.fail(f"train.{name}", "must be positive", f"set train.{name} to a positive integer")
        if t.global_batch_size % t.micro_batch_size:
            self.fail(("train.global_batch_size", "train.micro_batch_size"),
                      "global batch must be a multiple of the micro batch",
                      "make global = micro x accumulation steps x data-parallel size")
        if o.lr <= 0:
            self.fail("optimizer.lr", "must be positive", "use the paper's 3e-3 for MF-tiny")
        if not 0 <= s.min_lr <= o.lr:
            self.fail(("schedule.min_lr", "optimizer.lr"), "min_lr must lie in [0, lr]", "use min_lr = 0.1 x lr")
        if not 0.0 <= s.warmup_fraction < 1.0:
            self.fail("schedule.warmup_fraction", "must lie in [0, 1)", "use 0.01 (1% warm-up)")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            self.fail("optimizer.betas", "Adam needs two betas in [0, 1)", "use [0.9, 0.95]")
        if o.eps <= 0 or o.weight_decay < 0 or o.grad_clip < 0 or o.table_lr_multiplier <= 0:
            self.fail(("optimizer.eps", "optimizer.weight_decay", "optimizer.grad_clip",
                       "optimizer.table_lr_multiplier"),
                      "eps and table_lr_multiplier must be positive, weight_decay and grad_clip non-negative",
                      "see configs/memoryformer-tiny.yaml")
        if t.collective_timeout_s <= 0 or t.max_consecutive_skips <= 0:
            self.fail(("train.collective_timeout_s", "train.max_consecutive_skips"), "must be positive",
                      "train.collective_timeout_s=600, train.max_consecutive_skips=20")
        if t.spike_rollback != 0 and t.spike_rollback <= 1:
            self.fail("train.spike_rollback", "a spike is a loss above this factor times the recent mean, so it must "
                      "be above 1 (or 0: off)", "use train.spike_rollback=3.0, or 0 to turn it off")
        if c.interval <= 0 or c.keep <= 0:
            self.fail(("checkpoint.interval", "checkpoint.keep"), "must be positive",
                      "checkpoint.interval=1000, checkpoint.keep=3")
        if lg.interval <= 0 or lg.histogram_interval <= 0 or lg.peak_tflops <= 0:
            self.fail(("logging.interval", "logging.histogram_interval", "logging.peak_tflops"), "must be positive",
                      "see configs/cpu-smoke.yaml")

    def data(self) -> None:
        d = self.config.data
        if d.path is not None and d.sources:
            self.fail(("data.path", "data.sources"),
                      "give either one dataset (data.path) or a blend (data.sources), not both",
                      "remove one of them")
        for i, source in enumerate(d.sources):
            if not source.path or source.weight <= 0:
                self.fail("data.sources", f"entry {i} needs a path and a positive weight",
                          "write {path: DIR, weight: 1.0}")
        if d.num_workers < 0:
            self.fail("data.num_workers", "must be non-negative", "use 0 to read in the training process")
