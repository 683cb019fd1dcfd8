"""Crash-safe checkpoints: a kill -9 anywhere in a save, a full disk, a flipped byte, another model's checkpoint."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from megamem.checkpoint.catalog import complete_checkpoints
from megamem.cli.main import main
from tests.paths import CONFIGS, REPO
from tests.training.runs import losses, records, train

STEPS = 9
SETTINGS = ["checkpoint.interval=3", "checkpoint.keep=1", "train.eval_interval=1000"]


@pytest.fixture(scope="session")
def reference(shards, shared):
    """The uninterrupted run, trained once for every worker (tests/shared.py)."""
    def make(run) -> None:
        train(shards, run, *SETTINGS, steps=STEPS)

    return losses(shared.once("checkpoint-reference", make)[0])


# One process at ZeRO 0 writes two files per checkpoint (model and optimizer states, then its RNG state): the 3rd
# file is the step-6 checkpoint's first. With keep=1, saving step 6 removes step 3 after step 6 is complete.
@pytest.mark.parametrize("fault, resumed_at, left_behind", [
    ("checkpoint-file:cut:3", 3, "step-00000006"),        # DeepSpeed's file of step 6, half written, then kill -9
    ("checkpoint-marker:kill:2", 3, "step-00000006"),     # every file written, no marker yet
    ("checkpoint-prune:kill:2", 6, "step-00000003"),      # step 6 complete, step 3's marker and 1st file removed
])
def test_kill_during_a_save_resumes_from_a_complete_checkpoint(shards, tmp_path, reference, fault, resumed_at,
                                                               left_behind):
    """The kill leaves `left_behind` incomplete, files on disk and no marker; it is never loaded, the resumed losses
    are the uninterrupted run's, and it is removed once a newer checkpoint is complete."""
    run = tmp_path / "run"
    killed = train(shards, run, *SETTINGS, steps=STEPS, fault=fault, returncode=-9)
    assert "saved checkpoint" in killed.stdout
    assert [p.name for p in complete_checkpoints(run)] == [f"step-{resumed_at:08d}"]
    partial = run / "checkpoints" / left_behind
    assert not (partial / "megamem.json").exists() and any(partial.iterdir()), list(partial.iterdir())
    if fault.startswith("checkpoint-file"):
        [cut] = [p for p in partial.iterdir() if p.name.endswith("_states.pt")]
        assert 0 < cut.stat().st_size < 60 << 20, cut.stat().st_size          # half of DeepSpeed's 105 MB
    if fault.startswith("checkpoint-prune"):
        assert len(list(partial.iterdir())) == 1                                # of two files
    resumed = train(shards, run, *SETTINGS, steps=STEPS)
    assert f"at step {resumed_at}" in resumed.stdout
    assert [r["step"] for r in records(run) if "loss" in r] == list(range(1, STEPS + 1))
    got = losses(run)
    for step in range(resumed_at + 1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (fault, step)
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [f"step-{STEPS:08d}"]


def test_full_disk_keeps_the_previous_checkpoint_and_continues_or_stops(shards, tmp_path, reference):
    run = tmp_path / "continue"
    result = train(shards, run, *SETTINGS, steps=STEPS, fault="checkpoint-file:enospc:3")
    message = result.stdout
    assert "checkpoint " in message and "step-00000006 was not saved: writing" in message, message[-3000:]
    assert "No space left on device" in message
    assert re.search(r"needs about 0\.1\d\d GB and [\d.]+ GB are free", message), message[-3000:]
    assert "Training continues and tries again at step 9" in message
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000009"]
    assert losses(run)[STEPS] == pytest.approx(reference[STEPS], rel=1e-6)

    run = tmp_path / "stop"
    result = train(shards, run, *SETTINGS, "checkpoint.on_write_error=stop", steps=STEPS,
                   fault="checkpoint-file:enospc:3", returncode=2)
    assert "step-00000006 was not saved" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000003"]
    assert not (run / "checkpoints" / "step-00000006").exists()

    # a real failed write: torch's zip writer meets a file size limit (80 MB: above DeepSpeed's 66 MB shared-memory
    # file, below the 105 MB checkpoint) and reports it as a RuntimeError, not an OSError
    run = tmp_path / "limited"
    result = train(shards, run, *SETTINGS, steps=6, file_size_limit=80 << 20, returncode=2)
    assert "step-00000003 was not saved: writing" in result.stdout and "tries again at step 6" in result.stdout
    assert "step-00000006 was not saved" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not list((run / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_damaged_or_foreign_checkpoints_are_refused_by_name(shards, tmp_path, capsys):
    run = tmp_path / "run"
    train(shards, run, "checkpoint.interval=2", "checkpoint.keep=2", "train.eval_interval=1000", steps=4)
    newest = complete_checkpoints(run)[-1]
    command = [sys.executable, "-m", "megamem.cli.main", "train", str(CONFIGS / "cpu-smoke.yaml"), "--set",
               f"data.path={shards}", "--set", f"run.dir={run}", "--set", "train.steps=6"]

    other = subprocess.run(command + ["--set", "model.hidden_size=64", "--set", "model.num_heads=2"], cwd=REPO,
                           capture_output=True, text=True)
    assert other.returncode == 2 and "holds another model: model.hidden_size=128 there, 64 here, " \
                                     "model.num_heads=4 there, 2 here" in other.stderr, other.stderr[-2000:]

    # a checkpoint of another format version: refused in one line naming it (a copy of the run, in this process)
    foreign = tmp_path / "foreign"
    shutil.copytree(run, foreign)
    marker = foreign / "checkpoints" / newest.name / "megamem.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "version": 0}))
    assert main(["export", str(foreign), "--output", str(tmp_path / "foreign.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{marker} is checkpoint format version 0; this megamem reads version 1 only" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    model_file = newest / "mp_rank_00_model_states.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    model_file.write_bytes(bytes(data))
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    exported = main(["export", str(run), "--output", str(tmp_path / "model.safetensors")])   # in this process
    for status, err in ((refused.returncode, refused.stderr), (exported, capsys.readouterr().err)):
        assert status == 2 and f"{model_file} is corrupt: its sha256 differs" in err, err[-2000:]
        assert "Traceback" not in err
        earlier = complete_checkpoints(run)[0]
        assert f"--resume {earlier}" in err

    # resuming from the earlier one sets the damaged, newer one aside, so no later --resume auto picks it again
    resumed = subprocess.run(command + ["--resume", str(earlier)], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0 and f"moved aside to {run / 'checkpoints' / 'abandoned-step-00000004'}" in \
        resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000002", "step-00000006"]
