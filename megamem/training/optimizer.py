"""AdamW parameter groups and the learning-rate schedule.

Tables get sparse gradients (only hit rows move), which is why the paper trains
MemoryFormer at 3x the dense learning rate; some users go further and give the
tables their own multiplier, or exempt them (and norms) from weight decay.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megamem.config.schema import OptimizerConfig, ScheduleConfig
from megamem.model.memory_layer import MemoryLayer


def parameter_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Three groups: tables, norms and biases (1-D), everything else. Empty groups are left out."""
    tables = {id(m.tables) for m in model.modules() if isinstance(m, MemoryLayer)}
    buckets: dict[str, list] = {"tables": [], "norms_and_biases": [], "other": []}
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        kind = "tables" if id(param) in tables else "norms_and_biases" if param.dim() < 2 else "other"
        buckets[kind].append(param)
    settings = {
        "tables": (cfg.weight_decay if cfg.table_weight_decay else 0.0, cfg.lr * cfg.table_lr_multiplier),
        "norms_and_biases": (cfg.weight_decay if cfg.norm_weight_decay else 0.0, cfg.lr),
        "other": (cfg.weight_decay, cfg.lr),
    }
    return [{"params": params, "weight_decay": settings[name][0], "lr": settings[name][1], "name": name}
            for name, params in buckets.items() if params]


def parameter_group_names(model: nn.Module, cfg: OptimizerConfig) -> list[list[str]]:
    """The names of parameter_groups' parameters, in its order (how a saved torch optimizer state is keyed)."""
    names = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), name)
    return [[names[id(param)] for param in group["params"]] for group in parameter_groups(model, cfg)]


class SkippingAdamW(torch.optim.AdamW):
    """torch's AdamW, except that a step whose gradients are not finite on some rank is skipped, as DeepSpeed's
    ZeRO and bf16 optimizers skip one: `overflow` is the flag DeepSpeed's engine reads to count the step as skipped
    and hold the LR schedule. This is the optimizer that steps where neither is in use (fp32 without ZeRO)."""

    overflow = False

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None and p.grad.numel()]
        device = self.param_groups[0]["params"][0].device
        # a tensor is finite where its least and greatest elements are (NaN and infinities reach one of them): two
        # reductions read each gradient once, where isfinite writes a mask as large as it (ten times slower on CPU)
        finite = torch.isfinite(torch.stack([torch.stack(torch.aminmax(g)) for g in grads])).all().float() if grads \
            else torch.ones((), device=device)
        if dist.is_initialized():           # every rank skips together, or its replicas drift apart
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.overflow = not bool(finite.item())
        return None if self.overflow else super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, steps_itself: bool = False) -> torch.optim.Optimizer:
    """`steps_itself`: no DeepSpeed optimizer wraps this one (fp32 without ZeRO), so it must skip non-finite steps."""
    kind = SkippingAdamW if steps_itself else torch.optim.AdamW
    return kind(parameter_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, schedule: ScheduleConfig, lr: float) -> float:
    """Multiplier of each group's base LR after `step` optimizer steps: linear warm-up, then cosine to min_lr."""
    if schedule.kind == "constant":
        return 1.0
    warmup = int(schedule.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = schedule.min_lr / lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, schedule: ScheduleConfig, lr: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, schedule, lr))


def schedule_at(scheduler, groups: list[dict], step: int) -> None:
    """Set the LR schedule `step` steps in, from this run's config: after a resharded checkpoint (so --set
    optimizer.lr=... at reshard applies) or a rollback (which keeps the step count and the schedule goes on)."""
    scheduler.last_epoch, scheduler._step_count = step, step + 1
    for group, base_lr, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in groups]
