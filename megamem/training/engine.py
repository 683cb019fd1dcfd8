"""megamem's one door to DeepSpeed's engine.

Everything megamem needs from DeepSpeed beyond its documented calls lives here:
the attributes it reads or sets on DeepSpeed's engine, optimizer and parameters
(the step counters, the fp32 partitions of ZeRO 3, the lazy linking of ZeRO's
optimizer state, the pipeline's grid, a ZeRO-3 parameter's whole shape), the
one method it replaces (the pipeline's fp32 clipping), and the file writer it
swaps during a save. A DeepSpeed upgrade is checked here and in
megamem.checkpoint.read, which knows DeepSpeed's file layout, and nowhere else
(tests/test_architecture.py holds every other module to that).

The two ways a step runs are two classes behind one interface: PlainEngine
calls forward, backward and step per micro-batch; PipelineEngine hands the whole
step to DeepSpeed's pipeline schedule. The trainer does not know which it holds.
"""
from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from megamem.checkpoint.format import Marker
from megamem.checkpoint.read import MOMENTS, OPTIMIZER, WEIGHTS
from megamem.checkpoint.rng import restore_rng
from megamem.checkpoint.universal import local_slice
from megamem.checkpoint.write import CheckpointWriter
from megamem.config.schema import Config
from megamem.deepspeed_import import import_deepspeed
from megamem.errors import MegamemError
from megamem.model.init import materialize
from megamem.parallel.deepspeed_mpu import DeepSpeedMPU
from megamem.parallel.grad_norm import grad_norm
from megamem.parallel.pipeline import pipeline_module
from megamem.parallel.pipeline_layout import plain_names, stage_bounds
from megamem.parallel.state import ParallelState
from megamem.training.deepspeed_config import deepspeed_config
from megamem.training.optimizer import build_optimizer, build_scheduler, parameter_group_names, schedule_at

PHASES = ("data_ms", "forward_ms", "backward_ms", "optimizer_ms")


def whole_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole parameter `param` is part of: a tensor-parallel shard records the shape it was cut
    from, and ZeRO 3 keeps a partitioned parameter empty outside forward, with its shape in `ds_shape`."""
    shard = getattr(param, "shard", None)
    return tuple(shard.full_shape if shard is not None else getattr(param, "ds_shape", param.shape))


def build_engine(model: nn.Module, config: Config, state: ParallelState, loss_fn, device: torch.device) -> Engine:
    """The model given memory (this pipeline stage's layers only, under pp > 1), its optimizer and LR schedule,
    and DeepSpeed's engine around them."""
    deepspeed = import_deepspeed()
    if state.pp > 1:
        model = pipeline_module(model, config, state, loss_fn, device)
        _check_pipeline(model, config, state)
        mpu = None                                  # the pipeline engine uses the module's grid
    else:
        materialize(model, device, config.run.seed)
        mpu = DeepSpeedMPU(state)
    steps_itself = config.parallel.zero_stage == 0 and config.train.precision == "fp32"
    plain = plain_names(config.model.num_layers, state.pp)
    # named before DeepSpeed takes the parameters over (ZeRO 3 empties them, and the groups go by their shapes)
    order = [[plain(name) for name in group] for group in parameter_group_names(model, config.optimizer)]
    optimizer = build_optimizer(model, config.optimizer, steps_itself)
    scheduler = build_scheduler(optimizer, config.train.steps, config.schedule, config.optimizer.lr)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                       config=deepspeed_config(config, state.dp), mpu=mpu)
    kind = PipelineEngine if state.pp > 1 else PlainEngine
    return kind(ds, config, state, loss_fn, device, order)


def _check_pipeline(pipe, config: Config, state: ParallelState) -> None:
    """DeepSpeed cut the layers where megamem plan does, and its grid's groups (slice = tensor parallel, data,
    pipe) hold the ranks of megamem's tp, dp and pp groups."""
    bounds = stage_bounds(config.model.num_layers, state.pp)
    if [int(b) for b in pipe.parts] != bounds:
        raise RuntimeError(f"DeepSpeed split the pipeline at {list(pipe.parts)}, not at {bounds}")
    grid = pipe._grid
    theirs = {"tp": list(grid.slice_group), "dp": list(grid.dp_group), "pp": list(grid.pp_group)}
    ours = {kind: state.ranks_of(kind) for kind in theirs}
    if theirs != ours:
        raise RuntimeError(f"DeepSpeed's pipeline grid {theirs} and megamem's groups {ours} disagree on rank "
                           f"{state.rank}; both must lay ranks out tensor-parallel fastest, then data, then pipe")


class Engine(abc.ABC):
    """A DeepSpeed engine as the trainer, checkpoints and statistics use it; PlainEngine and PipelineEngine say how
    a step and a validation pass run."""

    def __init__(self, ds, config: Config, state: ParallelState, loss_fn, device: torch.device,
                 order: list[list[str]]):
        self.ds, self.config, self.state, self.loss_fn, self.device = ds, config, state, loss_fn, device
        self.optimizer_order = order       # the optimizer's parameters by plain name, group by group, as keyed
        self.plain_name: Callable[[str], str] = plain_names(config.model.num_layers, state.pp)
        self.accumulation = ds.gradient_accumulation_steps()
        # DeepSpeed reports the norm it clipped by except where it steps torch's optimizer itself (fp32 without
        # ZeRO): there every rank keeps whole, averaged gradients, and megamem measures them before the step
        self.measures_grad_norm = config.parallel.zero_stage == 0 and config.train.precision == "fp32"

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def skipped_steps(self) -> int:
        return self.ds.skipped_steps

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    @property
    def loss_scale(self) -> float:
        """The factor DeepSpeed's fp16 optimizers scale the loss and gradients by (dynamic), or 1."""
        return float(getattr(self.ds.optimizer, "loss_scale", None) or 1.0)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    @abc.abstractmethod
    def train_step(self, next_batch: Callable[[], torch.Tensor], measure_grad_norm: bool):
        """One optimizer step over `accumulation` micro-batches: (its mean loss, the whole model's gradient norm or
        None where the engine reports none, {phase: ms} where phases can be timed apart)."""

    @abc.abstractmethod
    def validation_sums(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """[sum of the batches' mean losses, their count] on this rank, float64, before averaging over replicas."""

    def set_step(self, step: int) -> None:
        """Make DeepSpeed's counters and the LR schedule `step` steps in (after a rollback or a resharded
        checkpoint: the schedule follows this run's config)."""
        schedule_at(self.ds.lr_scheduler, self.ds.optimizer.param_groups, step)
        self.ds.global_steps = step
        self.ds.global_samples = step * self.ds.train_batch_size()

    def save_files(self, root: Path, tag: str, writer: CheckpointWriter) -> None:
        """DeepSpeed's files of a checkpoint, each written through `writer` (collective)."""
        writer.inner = self.ds.checkpoint_engine
        self.ds.checkpoint_engine = writer
        try:
            self.ds.save_checkpoint(str(root), tag=tag, save_latest=False)
        finally:
            self.ds.checkpoint_engine = writer.inner

    def load_files(self, path: Path, marker: Marker) -> None:
        """Engine state from a checkpoint of this layout, and this rank's random states."""
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
        if loaded is None:
            raise MegamemError(f"DeepSpeed could not load {path}. Fix: check that the run's layout and ZeRO stage "
                               f"match")
        restore_rng(path, marker, dist.get_rank(), dist.get_world_size())

    def load_universal(self, path: Path, marker: Marker) -> None:
        """Fill this rank's engine from a resharded checkpoint (collective under ZeRO 3: every rank calls it):
        parameters, and through DeepSpeed's tensor-fragment API the fp32 masters and Adam's moments where ZeRO or
        the bf16 optimizer keep them, torch's AdamW state otherwise."""
        optimizer = self.ds.optimizer
        torch_adam = isinstance(optimizer, torch.optim.Optimizer)          # fp32 without ZeRO
        zero3 = hasattr(optimizer, "fp32_partitioned_groups_flat")
        links_lazily = hasattr(optimizer, "_lazy_init_hp_params_optimizer_state")
        if not (torch_adam or zero3 or links_lazily):
            raise MegamemError(f"{path} cannot be loaded into DeepSpeed's {type(optimizer).__name__} (mixed "
                               f"precision without ZeRO). Fix: resume it with --set parallel.zero_stage=1")
        base = optimizer if torch_adam else optimizer.optimizer     # torch's AdamW itself
        if marker.has_optimizer:
            _create_adam_state(base, getattr(optimizer, "fp32_partitioned_groups_flat", []))
            if links_lazily:
                # ZeRO 1/2 and bf16 link each parameter to its slice of Adam's flat state after their first step;
                # DeepSpeed's own universal-checkpoint loading links them the same way, before any step
                optimizer._lazy_init_hp_params_optimizer_state()
        with safe_open(str(path / WEIGHTS), framework="pt") as weights:
            moments = safe_open(str(path / OPTIMIZER), framework="pt") if marker.has_optimizer else None
            for name, param in self.module.named_parameters():
                plain = self.plain_name(name)
                if plain not in weights.keys():
                    raise MegamemError(f"{path} holds no parameter {plain}: it was resharded from another model. "
                                       f"Fix: train with the config.yaml megamem reshard wrote beside it")
                if zero3 and param.ds_numel % self.state.dp:
                    raise MegamemError(f"{plain} ({param.ds_numel} values) does not split evenly over "
                                       f"{self.state.dp} ZeRO-3 replicas, and DeepSpeed writes a resharded ZeRO-3 "
                                       f"parameter only when it does. Fix: resume with --set parallel.zero_stage=1 "
                                       f"(or 2), or a data-parallel size that divides it")
                shape, shard = whole_shape(param), getattr(param, "shard", None)
                value = local_slice(weights, plain, shape, shard, param.device)
                state = {kind: local_slice(moments, f"{kind}.{plain}", shape, shard, param.device)
                         for kind in MOMENTS} if moments else {}
                _set_parameter(base, param, value, state, torch_adam)
        if marker.has_optimizer and marker.optimizer_steps is not None:
            for state in base.state.values():
                if "step" in state:
                    steps = marker.optimizer_steps
                    state["step"] = torch.full_like(state["step"], steps) if torch.is_tensor(state["step"]) else steps
        self.set_step(marker.step)


class PlainEngine(Engine):
    """Forward, backward and step per micro-batch: every layout without a pipeline."""

    def __init__(self, *args):
        super().__init__(*args)
        # with one replica at fp32 ZeRO 0, DeepSpeed's gradient all-reduce averages over a group of one, after
        # copying every gradient into flat buffers and back (a tenth of a CPU step): no_sync leaves them in place
        self._reduction = self.ds.no_sync if self.measures_grad_norm and self.state.dp == 1 \
            else contextlib.nullcontext

    def train_step(self, next_batch, measure_grad_norm: bool):
        times = dict.fromkeys(PHASES, 0.0)
        losses = []
        norm = None
        for micro in range(self.accumulation):
            mark = time.perf_counter()
            batch = next_batch()
            times["data_ms"] += self._lap(mark)
            mark = time.perf_counter()
            loss = self.loss_fn(self.ds(batch[:, :-1]), batch[:, 1:])
            times["forward_ms"] += self._lap(mark)
            mark = time.perf_counter()
            with self._reduction():
                self.ds.backward(loss)
            times["backward_ms"] += self._lap(mark)
            if measure_grad_norm and micro == self.accumulation - 1 and self.measures_grad_norm:
                norm = grad_norm(self.module, self.state)
            mark = time.perf_counter()
            self.ds.step()
            times["optimizer_ms"] += self._lap(mark)
            losses.append(loss.detach())
        if norm is None:
            norm = self.ds.get_global_grad_norm()
        return torch.stack(losses).float().mean(), norm, times

    def validation_sums(self, batches):
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches:
            batch = batch.to(self.device)
            total += torch.stack([self.loss_fn(self.ds(batch[:, :-1]), batch[:, 1:]).double(),
                                  torch.ones((), dtype=torch.float64, device=self.device)])
        return total

    def _lap(self, mark: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - mark) * 1e3


class PipelineEngine(Engine):
    """DeepSpeed's pipeline schedule runs the whole step (train_batch, eval_batch): it interleaves micro-batches'
    forwards and backwards across stages, so only the whole step is timed, and its loss is the last stage's,
    averaged over the micro-batches and data-parallel replicas and broadcast to every stage."""

    def __init__(self, *args):
        super().__init__(*args)
        self._inputs: Iterator | None = None
        self._clip_across_stages()

    def train_step(self, next_batch, measure_grad_norm: bool):
        if self._inputs is None:
            self._inputs = _pipeline_inputs(next_batch)
        loss = self.ds.train_batch(self._inputs)
        return loss.detach().float(), self.ds.get_global_grad_norm(), {}

    def validation_sums(self, batches):
        """The last stage's mean over the batches, averaged over replicas by DeepSpeed and broadcast to every
        stage; so that it is the mean over batches, every replica evaluates as many (the smallest share)."""
        share = torch.tensor([len(batches)], device=self.device)
        dist.all_reduce(share, op=dist.ReduceOp.MIN, group=self.state.group("dp"))
        count = int(share.item())
        if count == 0:
            raise MegamemError(f"train.eval_steps={self.config.train.eval_steps} validation batches leave some of "
                               f"the {self.state.dp} data-parallel replicas none. Fix: set train.eval_steps to at "
                               f"least {self.state.dp}")
        mean = self.ds.eval_batch(((batch[:, :-1], batch[:, 1:]) for batch in batches[:count]),
                                  num_micro_batches=count)
        return torch.tensor([mean.item() * count, float(count)], dtype=torch.float64, device=self.device)

    def _clip_across_stages(self) -> None:
        """Make fp32 ZeRO 0 clipping use the whole model's norm, and report it.

        DeepSpeed's fp32 path (`clip_fp32_gradients`, the one it calls without ZeRO or
        mixed precision) counts a replicated parameter only on rank 0 of its "model
        parallel" group, which under a pipeline spans every stage, so later stages'
        norms and biases are left out of the norm it clips by; it also keeps no norm
        for get_global_grad_norm. Its other paths (ZeRO 1, bf16, fp16) count per
        tensor-parallel rank and are right.
        """
        ds, state = self.ds, self.state

        def clip() -> None:
            norm = grad_norm(ds.module, state)
            ds._global_grad_norm = norm
            scale = ds.gradient_clipping() / (norm + 1e-6)
            if scale < 1.0:
                for param in ds.module.parameters():
                    if param.grad is not None:
                        param.grad.detach().mul_(scale)

        ds.clip_fp32_gradients = clip


def _pipeline_inputs(next_batch):
    """(inputs, targets) as DeepSpeed's pipeline reads them: the first stage takes inputs, the last targets, the
    stages between read nothing."""
    while True:
        batch = next_batch()
        yield batch[:, :-1], batch[:, 1:]


def _create_adam_state(base, zero3_partitions: list) -> None:
    """torch's AdamW creates its state at the first step; a resumed engine has taken none yet. ZeRO 3 hands its
    fp32 partitions to AdamW's groups only while stepping, so those are named apart."""
    for tensor in [*(t for group in base.param_groups for t in group["params"]), *zero3_partitions]:
        if not base.state.get(tensor):
            base.state[tensor] = {"step": torch.zeros((), dtype=torch.float32),
                                  **{kind: torch.zeros_like(tensor) for kind in MOMENTS}}


def _set_parameter(base, param, value: torch.Tensor, moments: dict, torch_adam: bool) -> None:
    deepspeed = import_deepspeed()
    if hasattr(param, "ds_id"):      # ZeRO 3: the rank holds a partition; every replica writes the same whole
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.to(param.dtype))
    else:
        param.data.copy_(value.to(param.dtype))
    if torch_adam:                              # torch's AdamW holds the parameter itself
        for kind, tensor in moments.items():
            base.state[param][kind].copy_(tensor)
    else:                                       # ZeRO 1-3 and bf16 keep fp32 masters and Adam's state apart
        deepspeed.utils.safe_set_full_fp32_param(param, value.to(param.device))
        for kind, tensor in moments.items():
            deepspeed.utils.safe_set_full_optimizer_state(param, tensor.to(param.device), kind)
