"""Real training runs on CPU: outputs, ZeRO, tensor and pipeline equivalence, loading every layout, refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megamem.cli.main import main
from megamem.inference.load import load_trained
from tests.paths import CONFIGS, REPO
from tests.training.runs import EXACT_STEPS, REFERENCE_NUMERICS, STRAIGHT_STEPS, grad_norms, losses, records, train


def test_outputs_metrics_and_tensorboard_tags(shards, tmp_path):
    run = tmp_path / "run"
    result = train(shards, run, "logging.interval=2", "logging.histogram_interval=4", "train.eval_interval=6", steps=12)
    assert "tensorboard --logdir" in result.stdout and "step 12/12" in result.stdout
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step-00000012" / "megamem.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ([r["step"] for r in records] == [0, 2, 4, 6, 8, 10, 12]
            and set(records[0]) == {"step", "valid_loss", "valid_perplexity"})
    records = records[1:]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_gpu", "samples_per_sec", "mfu",
                "loss_scale", "data_ms", "forward_ms", "backward_ms", "optimizer_ms", "memory_gb", "buckets"):
        assert key in records[-1], key
    assert "valid_loss" in records[2] and "valid_perplexity" in records[-1]
    assert set(records[-1]["buckets"]["blocks.1.ml2"]) == {"entropy", "unused_fraction", "mean_p"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "valid/loss", "valid/perplexity", "train/lr", "train/grad_norm", "train/loss_scale",
                "perf/tokens_per_sec", "perf/samples_per_sec", "perf/tflops_per_gpu", "perf/mfu", "time/data_ms",
                "time/forward_ms", "time/backward_ms", "time/optimizer_ms", "memory/rss_gb",
                "buckets/blocks.0.qkv/entropy", "buckets/blocks.0.ml1/unused_fraction", "buckets/blocks.1.ml2/mean_p"):
        assert tag in scalars, tag
    histograms = set(events.Tags()["histograms"])
    assert {"buckets/qkv/first_table", "buckets/ml2/last_table"} <= histograms
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]


def exact_window(run_dir, reference_dir, name: str, rel: float = 1e-4) -> None:
    """Loss and whole-model gradient norm of each of the first EXACT_STEPS steps against the reference's (see
    tests/training/runs.py for the bound): Adam hardly sees a gradient that is wrong by a constant factor, but its
    norm does."""
    got, reference = losses(run_dir), losses(reference_dir)
    norms, reference_norms = grad_norms(run_dir), grad_norms(reference_dir)
    assert set(range(1, EXACT_STEPS + 1)) <= set(got), name
    for step in range(1, EXACT_STEPS + 1):
        assert got[step] == pytest.approx(reference[step], rel=rel), (name, step)
        assert norms[step] == pytest.approx(reference_norms[step], rel=rel), (name, step)


def record_at(run_dir, step: int) -> dict:
    return next(r for r in records(run_dir) if r["step"] == step and "loss" in r)


@pytest.mark.slow
def test_tensor_and_data_parallel_runs_match_one_process(layout_runs):
    """tp = 2 in both table layouts (column at ZeRO 1, table at ZeRO 0) and tp = 2 x dp = 2 under ZeRO 1, 2 and 3,
    against one process, fp32, the same global batch of 16 (4 micro-batches of 4 accumulated on one rank, 2 on each
    data-parallel replica). Split layers add the same terms as whole ones, in another order only where a sum crosses
    ranks (p's gradient, Norm3's statistics, the vocabulary-parallel softmax, the data-parallel all-reduce), so the
    losses and gradient norms agree to float32 rounding over the exact window: 2.1e-7 relative at most when
    measured."""
    reference = layout_runs["one"].dir
    assert losses(reference)[EXACT_STEPS] < losses(reference)[1] - 0.5               # it learns
    layouts = ("column", "table", "tp2-dp2-zero1", "tp2-dp2-zero2", "tp2-dp2-zero3")
    for name in layouts:
        assert "tp=2" in layout_runs[name].stdout, name
        exact_window(layout_runs[name].dir, reference, name)
    stats = record_at(reference, EXACT_STEPS)["buckets"]
    for name in layouts:                # bucket statistics summed over TP and DP: the one-process model's
        got = record_at(layout_runs[name].dir, EXACT_STEPS)["buckets"]
        for layer, layer_stats in stats.items():
            assert got[layer] == pytest.approx(layer_stats, rel=1e-4), (name, layer)
    per_token = {name: r["tp_forward_bytes_per_token"] + r["tp_backward_bytes_per_token"]
                 for name in ("column", "table") for r in [record_at(layout_runs[name].dir, EXACT_STEPS)]}
    assert 0 < per_token["column"] < per_token["table"], per_token          # logged, and column moves less

    # A checkpoint's shards belong to the layout that wrote them: resuming it in another is refused up front, before
    # the run's directory is touched (its config.yaml still describes its checkpoints).
    table = layout_runs["table"].dir
    written = (table / "config.yaml").read_text()
    command = [sys.executable, "-m", "megamem.cli.main", "train", str(CONFIGS / "cpu-smoke.yaml"), "--set",
               f"data.path={layout_runs.shards}", "--set", f"run.dir={table}", "--set", "train.steps=20",
               *[part for setting in REFERENCE_NUMERICS for part in ("--set", setting)]]
    moved = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert moved.returncode == 2 and "was written with parallel.tp=2, parallel.table_sharding=table, 1 " \
                                     "data-parallel replica(s), ZeRO 0; this run has parallel.tp=1" in moved.stderr, \
        moved.stderr[-2000:]
    assert (table / "config.yaml").read_text() == written

    # The one loading function (eval, generate, lm-eval, export) consolidates every layout into the one-process
    # model (vocabulary cut to the one-process padding). The hash makes weights-to-codes discontinuous: a
    # rounding-level difference can send one token to another row, which Adam then moves by about the LR (3e-3)
    # whatever the gradient's size, while a wrong reassembly would misplace rows by the tables' own scale (0.02).
    one, _ = one_process_model(layout_runs["one"].checkpoint())
    reference_weights = dict(one.named_parameters())
    for name, zero, atol in (("table", 0, 3e-3), ("tp2-dp2-zero2", 2, 3e-3), ("tp2-dp2-zero3", 3, 5e-3)):
        model, config = one_process_model(layout_runs[name].checkpoint())       # whole tables; ZeRO 2 and 3 parts
        assert config.parallel.tp == 1 and config.parallel.zero_stage == zero
        assert model.embed.weight.shape == one.embed.weight.shape
        for param_name, param in model.named_parameters():
            torch.testing.assert_close(param, reference_weights[param_name], rtol=0, atol=atol,
                                       msg=f"{name} {param_name}")


@pytest.mark.slow
def test_pipeline_runs_match_one_process(layout_runs, capsys):
    """pp = 2 (ZeRO 0, where megamem replaces DeepSpeed's clipping norm), tp = 2 x pp = 2, pp = 2 x dp = 2 under
    ZeRO 1, pp = 2 with activation checkpointing, and the dense model at pp = 2, each against one process, fp32,
    global batch 16. A pipeline runs the same layers on the same micro-batches; what differs is where sums cross
    ranks (as under tensor parallelism) and the order in which micro-batches' gradients add up, so the losses agree
    to float32 rounding: 1.1e-7 relative at most when measured. The bound is the tensor-parallel test's; the
    gradient norm (with clipping at 1.0 active: the norms are above 2) must agree too, which a norm leaving out a
    stage's parameters would not."""
    layouts = {"pp2": "one", "tp2-pp2": "one", "pp2-dp2-zero1": "one", "pp2-checkpointed": "one",
               "dense-pp2": "dense"}
    for name, reference in layouts.items():
        assert "pp=2" in layout_runs[name].stdout, name
        exact_window(layout_runs[name].dir, layout_runs[reference].dir, name)
        assert losses(layout_runs[name].dir, "valid_loss")[EXACT_STEPS] == pytest.approx(
            losses(layout_runs[reference].dir, "valid_loss")[EXACT_STEPS], rel=1e-4), name
    last = record_at(layout_runs["tp2-pp2"].dir, EXACT_STEPS)
    assert "forward_ms" not in last and last["step_ms"] > 0                  # a pipeline times whole steps
    for layer, stats in record_at(layout_runs["one"].dir, EXACT_STEPS)["buckets"].items():   # every stage's layers
        assert last["buckets"][layer] == pytest.approx(stats, rel=1e-3), layer                # under plain names

    # Loading joins stages' layer files (and ZeRO 1's fp32 partitions) into the one-process model, within about one
    # Adam step (the LR, 3e-3) for the rows a rounding difference sent elsewhere, as in the tensor-parallel test;
    # megamem eval of that model on the run's validation split is the pipeline's own logged valid_loss.
    one, _ = one_process_model(layout_runs["one"].checkpoint())
    reference = dict(one.named_parameters())
    for name in ("tp2-pp2", "pp2-dp2-zero1"):
        checkpoint = layout_runs[name].checkpoint()
        model, config = one_process_model(checkpoint)
        assert config.parallel.pp == 1 and sorted(dict(model.named_parameters())) == sorted(reference)
        for param_name, param in model.named_parameters():
            torch.testing.assert_close(param, reference[param_name], rtol=0, atol=3e-3, msg=f"{name} {param_name}")
        capsys.readouterr()
        assert main(["eval", str(checkpoint), "--data", str(layout_runs.shards), "--json"]) == 0
        evaluated = json.loads(capsys.readouterr().out)["loss"]
        assert evaluated == pytest.approx(losses(layout_runs[name].dir, "valid_loss")[EXACT_STEPS], rel=1e-4), name


def one_process_model(source):
    """(model, config) through megamem.inference.load_trained, which every command that uses a model goes through."""
    trained = load_trained(source)
    return trained.model, trained.config


@pytest.mark.parametrize("overrides, nproc, message", [
    (["train.global_batch_size=4"], 2, r"train.global_batch_size=4 is not a multiple of train.micro_batch_size=4 x "
                                       r"data-parallel size 2 = 8"),
    (["train.global_batch_size=16"], 3, r"global_batch_size=16 is not a multiple of train.micro_batch_size=4 x "
                                        r"data-parallel size 3 = 12"),
    (["parallel.pp=3"], 3, r"parallel.pp=3, model.num_layers=2: more pipeline stages than blocks"),
    (["parallel.pp=2", "model.tie_embeddings=true"], 2, r"a tied embedding and head would sit on the first and last"),
    (["parallel.pp=2", "train.precision=bf16"], 2, r"use parallel.zero_stage=1 for bf16 pipelining"),
    (["parallel.tp=2"], 3, r"3 processes cannot host parallel.tp=2 x parallel.pp=1 = 2 ranks per replica"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 1, r"DeepSpeed refuses ZeRO stage 2 or 3 with pipeline parallelism"),
])
def test_layouts_the_process_count_cannot_satisfy_are_refused(shards, tmp_path, capsys, overrides, nproc, message):
    """In this process: each is refused before a rank starts, so nothing here trains."""
    assert_refused(shards, tmp_path, capsys, overrides, nproc, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal")
def test_fp16_is_refused_on_a_cpu_without_it(shards, tmp_path, capsys, monkeypatch):
    """DeepSpeed asks oneDNN whether this CPU has fp16 (recent server CPUs do): pinned to one that has none, the
    refusal every such machine gives."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: False)
    assert_refused(shards, tmp_path, capsys, ["train.precision=fp16"], 1, "DeepSpeed has no fp16 on this CPU")


def assert_refused(shards, tmp_path, capsys, overrides, nproc, message):
    argv = ["train", str(CONFIGS / "cpu-smoke.yaml"), "--nproc", str(nproc),
            "--set", f"data.path={shards}", "--set", f"run.dir={tmp_path / 'run'}"]
    for override in overrides:
        argv += ["--set", override]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and message.replace("\\", "") in err.replace("\\", ""), err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_refusals_name_the_problem(shards, straight_runs, tmp_path):
    """Each is refused before anything is written, so a finished run serves."""
    run = straight_runs["one-process"].dir
    command = [sys.executable, "-m", "megamem.cli.main", "train", str(CONFIGS / "cpu-smoke.yaml"),
               "--set", f"data.path={shards}", "--set", f"run.dir={run}"]
    again = subprocess.run(command + ["--resume", "none"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and f"already holds checkpoints (newest: step-{STRAIGHT_STEPS:08d})" in \
        again.stderr
    wrong = subprocess.run(command + ["--set", "model.seq_len=64"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "holds sequences of 128 tokens but model.seq_len is 64" in wrong.stderr
    no_data = subprocess.run(command + ["--set", "data.path=null", "--set", f"run.dir={tmp_path / 'r2'}"],
                             cwd=REPO, capture_output=True, text=True)
    assert no_data.returncode == 2 and "no training data: set data.path" in no_data.stderr
