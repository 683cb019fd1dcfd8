"""Mixed precision as it ships: bf16 trained for real on CPU at ZeRO 0-3 and in the tensor- and pipeline-parallel
layouts, a non-finite step skipped and counted in every precision, megamem reshard carrying bf16 ZeRO 1's Adam
moments, and megamem export taking the fp32 master weights.

The runs (tests/training/runs.py, PRECISIONS) train 20 steps of cpu-smoke from the same initial weights, and each
meets a non-finite loss in step 2. Against fp32, how close: the step-1 forward and backward from the same weights
differ by 16-bit rounding of activations and gradients (2^-9 relative each for bf16, 2^-12 for fp16). Measured: the
step-1 loss 5.7e-4 apart (bf16), bound 2^-8 = 3.9e-3; the step-1 gradient norm 3.1e-3 to 3.5e-3 apart, bound
2^-6 = 1.6e-2. By step 20 the runs have also rounded every update (and at ZeRO 0, where DeepSpeed keeps bf16
gradients, summed micro-batches in bf16): the mean loss over steps 16-20 was 0.36% to 1.41% above fp32's in the
seven bf16 runs, bound 3%, about one step of training at that point, while those 20 steps take the loss from 5.55
to 3.0.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from megamem.checkpoint.read import load_deepspeed_file
from megamem.cli.main import main
from megamem.config import load_config
from megamem.model import build_model
from megamem.training.optimizer import parameter_group_names
from tests.training.runs import PRECISION_STEPS, PRECISIONS, losses, records

BF16 = [name for name in PRECISIONS if name.startswith("bf16")]


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_a_non_finite_step_is_skipped_and_counted(precision_runs, name):
    """fp32 at ZeRO 0 (megamem's AdamW skips), fp32 ZeRO 1, bf16 and fp16 (DeepSpeed's optimizers skip, the fp16
    one by its dynamic loss scaler, whose scale is logged), one process and across ranks: the step is counted, the
    LR schedule holds, and the weights stay finite."""
    run = precision_runs[name].dir
    steps = {r["step"]: r for r in records(run) if "loss" in r}
    assert steps[2]["skipped"] == 1.0 and math.isnan(steps[2]["loss"]), steps[2]
    assert [steps[s]["skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 1, 1]
    assert all(math.isfinite(steps[s]["loss"]) and steps[s]["skipped"] == 0 for s in steps if s != 2)
    assert steps[3]["loss"] < steps[1]["loss"]                  # the skipped step left the weights finite
    assert steps[2]["lr"] == steps[1]["lr"] > steps[3]["lr"]                         # the schedule held a step
    scales = [steps[s]["loss_scale"] for s in sorted(steps)]
    if name.startswith("fp16"):                 # dynamic: halved by the overflow, then held (1,000-step window)
        assert scales == [2.0**16] + [2.0**15] * (PRECISION_STEPS - 1), scales
    else:
        assert set(scales) == {1.0}, scales
    fp32 = next(r for r in records(precision_runs["fp32-zero0"].dir) if r["step"] == 1 and "loss" in r)
    assert steps[1]["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=2**-6)   # unscaled, whole-model norm


@pytest.mark.parametrize("name", BF16)
def test_bf16_trains_like_fp32(precision_runs, name):
    """The bounds are derived in the module's docstring."""
    assert ", bf16) into" in precision_runs[name].stdout
    got, fp32 = losses(precision_runs[name].dir), losses(precision_runs["fp32-zero0"].dir)
    assert sorted(got) == list(range(1, PRECISION_STEPS + 1))
    assert got[1] == pytest.approx(fp32[1], rel=2**-8) and got[1] != fp32[1]         # bf16 from the first forward
    last = range(PRECISION_STEPS - 4, PRECISION_STEPS + 1)
    mean, fp32_mean = (sum(curve[s] for s in last) / len(last) for curve in (got, fp32))
    assert mean < got[1] - 2.0, (name, mean)                                          # it learns
    assert mean == pytest.approx(fp32_mean, rel=0.03), (name, mean, fp32_mean)


def _flat_groups(checkpoint, config) -> tuple[list[list[str]], dict]:
    """A bf16 ZeRO 1 rank's fp32 partitions as DeepSpeed wrote them, read without megamem's reader: one flat tensor
    per parameter group (one rank: the whole group), the parameters in the group's order."""
    [optimizer_file] = checkpoint.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    state = load_deepspeed_file(optimizer_file)["optimizer_state_dict"]
    names = parameter_group_names(build_model(config, device="meta"), config.optimizer)
    return names, state


def _split(flat: torch.Tensor, names: list[str], shapes: dict) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in names:
        size = math.prod(shapes[name])
        out[name] = flat[offset:offset + size].reshape(shapes[name])
        offset += size
    return out


def test_reshard_of_bf16_zero1_carries_adams_moments(precision_runs, tmp_path, capsys):
    """Every moment megamem reshard writes is DeepSpeed's own fp32 moment of that parameter, to the bit."""
    source = precision_runs["bf16-zero1"]
    checkpoint = source.checkpoint(PRECISION_STEPS)
    made = main(["reshard", str(source.dir), "--tp", "2", "--pp", "1", "--checkpoint", str(checkpoint),
                 "--output", str(tmp_path / "tp2")])
    assert made == 0, capsys.readouterr().err[-3000:]
    config = load_config([source.dir / "config.yaml"])
    names, state = _flat_groups(checkpoint, config)
    shapes = {name: tuple(p.shape) for name, p in build_model(config, device="meta").named_parameters()}
    written = load_file(str(tmp_path / "tp2" / "checkpoints" / f"step-{PRECISION_STEPS:08d}" /
                            "optimizer.safetensors"))
    for group, group_names in enumerate(names):
        for kind in ("exp_avg", "exp_avg_sq"):
            expected = _split(state["base_optimizer_state"]["state"][group][kind], group_names, shapes)
            for name in group_names:
                assert torch.equal(written[f"{kind}.{name}"], expected[name]), (kind, name)
    assert int(state["base_optimizer_state"]["state"][0]["step"]) == PRECISION_STEPS - 1     # one step skipped


@pytest.mark.parametrize("zero", [0, 1])
def test_export_of_bf16_takes_the_fp32_master_weights(precision_runs, tmp_path, capsys, zero):
    """The exported tensors are DeepSpeed's fp32 masters to the bit (ZeRO 1: its flat partitions; ZeRO 0: the fp32
    copies its bf16 optimizer keeps beside the module), not the module's bf16 weights: those are the masters
    rounded, and hold fewer bits."""
    source = precision_runs[f"bf16-zero{zero}"]
    checkpoint = source.checkpoint(PRECISION_STEPS)
    assert main(["export", str(source.dir), "--output", str(tmp_path / "model.safetensors")]) == 0
    exported = load_file(str(tmp_path / "model.safetensors"))
    config = load_config([source.dir / "config.yaml"])
    model_states = load_deepspeed_file(checkpoint / "mp_rank_00_model_states.pt")
    shapes = {name: tuple(p.shape) for name, p in build_model(config, device="meta").named_parameters()}
    if zero == 1:
        names, state = _flat_groups(checkpoint, config)
        masters = {}
        for group, group_names in enumerate(names):
            masters.update(_split(state["single_partition_of_fp32_groups"][group], group_names, shapes))
    else:
        names = parameter_group_names(build_model(config, device="meta"), config.optimizer)
        copies = model_states["optimizer"]["fp32_groups"]
        masters = {name: tensor for group, group_names in zip(copies, names, strict=True)
                   for name, tensor in zip(group_names, group, strict=True)}
    assert set(masters) == set(exported)
    finer = 0
    for name, master in masters.items():
        assert master.dtype == torch.float32 and torch.equal(exported[name], master), name
        module = model_states["module"][name]
        assert module.dtype == torch.bfloat16 and torch.equal(master.to(torch.bfloat16), module), name
        finer += int(not torch.equal(master, module.float()))
    assert finer > len(masters) // 2        # updated masters hold bits their bf16 copies do not
