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
from tests.training.runs import REFERENCE_NUMERICS, grad_norms, losses, train


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


def test_zero_stages_on_two_ranks_match_one_process(shards, tmp_path):
    """Same global batch (16 = 4 x 4 accumulation on one rank, 4 x 2 accumulation x 2 ranks), fp32: the per-step losses
    may differ
    only by the order of floating-point sums (gradient all-reduce vs local accumulation), about 1e-7 relative per
    step, amplified over 10 Adam steps. The hash amplifies it further: a rounding-level change can send a token to
    another row (see the export check below), and losses were seen 1.1e-4 apart by step 8. 1e-3 relative is still
    far below the step-to-step change of the loss (>1e-2), which a wrong gradient reduction would show."""
    batch = ["train.global_batch_size=16", "train.eval_interval=1000", *REFERENCE_NUMERICS]
    train(shards, tmp_path / "one", *batch, "parallel.zero_stage=0")
    reference = losses(tmp_path / "one")
    assert len(reference) == 10 and reference[10] < reference[1] - 0.5
    for stage in (1, 2, 3):
        train(shards, tmp_path / f"zero{stage}", *batch, f"parallel.zero_stage={stage}", nproc=2)
        got = losses(tmp_path / f"zero{stage}")
        for step in range(1, 11):
            assert got[step] == pytest.approx(reference[step], rel=1e-3), (stage, step)

    # The one loading function (eval, generate, lm-eval, export) consolidates ZeRO-3 partitions into the same
    # parameters. The hash makes weights-to-codes discontinuous:
    # a rounding-level difference can send one token to another row, and Adam moves a row it touches by about the
    # LR (3e-3) whatever the gradient's size. So weights may differ by up to about 1.5 Adam steps, while a wrong
    # reassembly would misplace rows by the tables' own scale (std 0.02).
    model, config = one_process_model(tmp_path / "zero3")
    one, _ = one_process_model(tmp_path / "one")
    assert config.parallel.zero_stage == 3
    reference = dict(one.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=5e-3, msg=name)


def test_tensor_parallel_runs_match_one_process(shards, tmp_path):
    """tp = 2 in both table layouts, and tp = 2 x dp = 2 under ZeRO 1, 2 and 3, against one process, fp32, same
    global batch of 16. Split layers add the same terms as whole ones, in another order only where a sum crosses
    ranks (p's gradient, Norm3's statistics, the vocabulary-parallel softmax, the data-parallel all-reduce), so the
    losses agree to float32 rounding: 1.2e-7 relative at most over these 10 steps when measured. 1e-4 leaves room
    for a hash flip near zero, which moves a token to another row (the ZeRO test above saw 1.1e-4 from such flips
    by step 8), and is far below the loss's change per step (>1e-2). Adam hardly sees a gradient that is wrong by a
    constant factor, so the logged gradient norm (the whole model's) is compared too."""
    batch = ["train.global_batch_size=16", "train.eval_interval=1000", *REFERENCE_NUMERICS]
    train(shards, tmp_path / "one", *batch)
    reference = losses(tmp_path / "one")
    reference_norms = grad_norms(tmp_path / "one")
    layouts = {"column": (2, ["parallel.tp=2"]), "table": (2, ["parallel.tp=2", "parallel.table_sharding=table"]),
               **{f"dp2-zero{z}": (4, ["parallel.tp=2", f"parallel.zero_stage={z}"]) for z in (1, 2, 3)}}
    for name, (nproc, overrides) in layouts.items():
        result = train(shards, tmp_path / name, *batch, *overrides, nproc=nproc)
        assert "tp=2" in result.stdout, name
        got = losses(tmp_path / name)
        assert sorted(got) == list(range(1, 11)), name
        norms = grad_norms(tmp_path / name)              # the whole model's: shards on every rank, the rest once
        for step in range(1, 11):
            assert got[step] == pytest.approx(reference[step], rel=1e-4), (name, step)
            assert norms[step] == pytest.approx(reference_norms[step], rel=1e-4), (name, step)
    last = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][-1]
            for name in ("one", *layouts)}
    for name in layouts:                # bucket statistics summed over TP and DP: the one-process model's
        for layer, stats in last["one"]["buckets"].items():
            assert last[name]["buckets"][layer] == pytest.approx(stats, rel=1e-4), (name, layer)
    received = {name: last[name] for name in ("column", "table")}
    per_token = {name: r["tp_forward_bytes_per_token"] + r["tp_backward_bytes_per_token"]
                 for name, r in received.items()}
    assert 0 < per_token["column"] < per_token["table"], per_token          # logged, and column moves less

    # A checkpoint's shards belong to the layout that wrote them: resuming it in another is refused up front.
    command = [sys.executable, "-m", "megamem.cli.main", "train", str(CONFIGS / "cpu-smoke.yaml"), "--set",
               f"data.path={shards}", "--set", f"run.dir={tmp_path / 'column'}", "--set", "train.steps=20",
               *[part for setting in REFERENCE_NUMERICS for part in ("--set", setting)]]
    moved = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert moved.returncode == 2 and "was written with parallel.tp=2, parallel.table_sharding=column, 1 " \
                                     "data-parallel replica(s), ZeRO 0; this run has parallel.tp=1" in moved.stderr, \
        moved.stderr[-2000:]

    # The tp = 2 model loads as the one-process model (vocabulary cut to the one-process padding); the hash makes
    # weights-to-codes discontinuous, so allow about one Adam step (the LR, 3e-3) as in the ZeRO export check above.
    one, _ = one_process_model(tmp_path / "one")
    reference = dict(one.named_parameters())
    for name in ("dp2-zero2", "table"):            # ZeRO-2 partitions of column shards; whole tables under ZeRO 0
        model, config = one_process_model(tmp_path / name)
        assert config.parallel.tp == 1 and model.embed.weight.shape == one.embed.weight.shape
        for param_name, param in model.named_parameters():
            torch.testing.assert_close(param, reference[param_name], rtol=0, atol=3e-3, msg=f"{name} {param_name}")


def test_pipeline_runs_match_one_process(shards, tmp_path, capsys):
    """pp = 2 (ZeRO 0, where megamem replaces DeepSpeed's clipping norm), tp = 2 x pp = 2, pp = 2 x dp = 2 under
    ZeRO 1, pp = 2 with activation checkpointing, and the dense model at pp = 2, each against one process, fp32,
    global batch 16. A pipeline runs the same layers on the same micro-batches; what differs is where sums cross
    ranks (as under tensor parallelism) and the order in which micro-batches' gradients add up, so the losses agree
    to float32 rounding: 2.2e-6 relative at most over 5 steps when measured. The bound of 1e-4 is the tensor-parallel
    test's, argued there; the gradient norm (with clipping at 1.0 active: the norms are above 2) must agree too, which
    a norm leaving out a stage's parameters would not."""
    batch = ["train.global_batch_size=16", "train.eval_interval=5", *REFERENCE_NUMERICS]
    layouts = {"pp2": ("memoryformer", 2, ["parallel.pp=2"]),
               "tp2-pp2": ("memoryformer", 4, ["parallel.pp=2", "parallel.tp=2"]),
               "pp2-dp2-zero1": ("memoryformer", 4, ["parallel.pp=2", "parallel.zero_stage=1"]),
               "pp2-checkpointed": ("memoryformer", 2, ["parallel.pp=2", "train.activation_checkpointing=true"]),
               "dense-pp2": ("dense", 2, ["parallel.pp=2"])}
    for arch in ("memoryformer", "dense"):
        train(shards, tmp_path / arch, *batch, f"model.arch={arch}", steps=5)
    for name, (arch, nproc, overrides) in layouts.items():
        result = train(shards, tmp_path / name, *batch, f"model.arch={arch}", *overrides, nproc=nproc, steps=5)
        assert "pp=2" in result.stdout, name
        got, reference = losses(tmp_path / name), losses(tmp_path / arch)
        norms, reference_norms = grad_norms(tmp_path / name), grad_norms(tmp_path / arch)
        assert sorted(got) == list(range(1, 6)), name
        for step in range(1, 6):
            assert got[step] == pytest.approx(reference[step], rel=1e-4), (name, step)
            assert norms[step] == pytest.approx(reference_norms[step], rel=1e-4), (name, step)
        assert losses(tmp_path / name, "valid_loss")[5] == pytest.approx(losses(tmp_path / arch, "valid_loss")[5],
                                                                        rel=1e-4), name
    last = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][-1]
            for name in ("memoryformer", "tp2-pp2")}
    assert "forward_ms" not in last["tp2-pp2"] and last["tp2-pp2"]["step_ms"] > 0      # a pipeline times whole steps
    for layer, stats in last["memoryformer"]["buckets"].items():        # every stage's layers, under plain names
        assert last["tp2-pp2"]["buckets"][layer] == pytest.approx(stats, rel=1e-3), layer

    # Loading joins stages' layer files (and ZeRO 1's fp32 partitions) into the one-process model, within about one
    # Adam step (the LR, 3e-3) for the rows a rounding difference sent elsewhere, as in the tensor-parallel test;
    # megamem eval of that model on the run's validation split is the pipeline's own logged valid_loss.
    one, _ = one_process_model(tmp_path / "memoryformer")
    reference = dict(one.named_parameters())
    for name in ("tp2-pp2", "pp2-dp2-zero1"):
        model, config = one_process_model(tmp_path / name)
        assert config.parallel.pp == 1 and sorted(dict(model.named_parameters())) == sorted(reference)
        for param_name, param in model.named_parameters():
            torch.testing.assert_close(param, reference[param_name], rtol=0, atol=3e-3, msg=f"{name} {param_name}")
        capsys.readouterr()
        assert main(["eval", str(tmp_path / name), "--data", str(shards), "--json"]) == 0
        evaluated = json.loads(capsys.readouterr().out)["loss"]
        assert evaluated == pytest.approx(losses(tmp_path / name, "valid_loss")[5], rel=1e-4), name


def one_process_model(run_dir):
    """(model, config) through megamem.inference.load_trained, which every command that uses a model goes through."""
    trained = load_trained(run_dir)
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
    pytest.param(["train.precision=fp16"], 1, r"DeepSpeed has no fp16 on CPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="fp16 is refused on CPU only")),
])
def test_layouts_the_process_count_cannot_satisfy_are_refused(shards, tmp_path, overrides, nproc, message):
    command = [sys.executable, "-m", "megamem.cli.main", "train", str(CONFIGS / "cpu-smoke.yaml"),
               "--nproc", str(nproc),
               "--set", f"data.path={shards}", "--set", f"run.dir={tmp_path / 'run'}"]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and message.replace("\\", "") in result.stderr.replace("\\", "")


def test_refusals_name_the_problem(shards, tmp_path):
    run = tmp_path / "run"
    train(shards, run, steps=2)
    command = [sys.executable, "-m", "megamem.cli.main", "train", str(CONFIGS / "cpu-smoke.yaml"),
               "--set", f"data.path={shards}", "--set", f"run.dir={run}"]
    again = subprocess.run(command + ["--resume", "none"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds checkpoints (newest: step-00000002)" in again.stderr
    wrong = subprocess.run(command + ["--set", "model.seq_len=64"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "holds sequences of 128 tokens but model.seq_len is 64" in wrong.stderr
    no_data = subprocess.run(command + ["--set", "data.path=null", "--set", f"run.dir={tmp_path / 'r2'}"],
                             cwd=REPO, capture_output=True, text=True)
    assert no_data.returncode == 2 and "no training data: set data.path" in no_data.stderr
