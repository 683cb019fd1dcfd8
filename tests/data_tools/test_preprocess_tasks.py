"""megamem preprocess over N tasks and a merge: the bytes of one task, whatever N and the workers; a killed task
rerun alone; a merge that cannot be complete is refused by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megamem.cli.main import main
from megamem.data_tools.preprocess import PreprocessArgs, preprocess
from megamem.data_tools.preprocess_tasks import (
    TASKS,
    merge,
    run_task,
    task_dir,
    task_files,
    task_from_environment,
)
from megamem.errors import DataError
from tests.data_tools.conftest import documents, kill_once_saved

ARGS = dict(seq_len=31, valid_fraction=0.1, shard_size_mb=0.004)


@pytest.fixture
def inputs(tmp_path):
    """Seven jsonl files of different sizes and a text file, so that tasks split them unevenly."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = documents(700, seed=3)
    cuts = [0, 40, 45, 190, 300, 310, 520, 690, 700]
    for i, (start, stop) in enumerate(zip(cuts, cuts[1:], strict=False)):
        (folder / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[start:stop]))
    (folder / "notes.txt").write_text("a text file is one document\n" * 40)
    return folder


def dataset_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def one_task(inputs, tmp_path):
    out = tmp_path / "one"
    preprocess(PreprocessArgs([str(inputs)], str(out), **ARGS))
    return dataset_bytes(out)


def in_tasks(inputs, out, num_tasks, workers=1, order=None):
    for task in order or range(num_tasks):
        run_task(PreprocessArgs([str(inputs)], str(out), workers=workers, **ARGS), task, num_tasks)
    return merge(out)


@pytest.mark.parametrize("num_tasks, workers", [(1, 1), (2, 2), (3, 1), pytest.param(7, 2, marks=pytest.mark.slow)])
def test_tasks_and_merge_write_the_bytes_of_one_task(inputs, one_task, tmp_path, num_tasks, workers):
    out = tmp_path / "tasks"
    summary = in_tasks(inputs, out, num_tasks, workers, order=reversed(range(num_tasks)))
    got = dataset_bytes(out)
    assert got == one_task and len([n for n in got if n.endswith(".tar")]) > 3
    assert not (out / TASKS).exists()
    manifest = json.loads(got["manifest.json"])
    assert summary.counts.documents == manifest["counts"]["documents"] == 701 and summary.counts.files == 9


def test_tasks_split_the_sorted_files_into_runs_balanced_by_size(inputs):
    files = sorted(inputs.iterdir())
    for num_tasks in (1, 2, 3, 7, 12):
        parts = task_files(files, num_tasks)
        assert len(parts) == num_tasks and [f for part in parts for f in part] == files
    sizes = [sum(f.stat().st_size for f in part) for part in task_files(files, 2)]
    assert max(sizes) - min(sizes) <= max(f.stat().st_size for f in files)


@pytest.mark.parametrize("dedup", ["none", "exact"])
def test_a_killed_task_is_rerun_alone_and_the_bytes_are_the_same(tmp_path, dedup):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.jsonl").write_text("".join(json.dumps({"text": d * 20}) + "\n"        # file 2 repeats 0
                                                   for d in documents(1000, seed=i % 2)))
    command = [sys.executable, "-m", "megamem.cli.main", "preprocess", "--input", str(corpus), "--seq-len", "255",
               "--shard-size-mb", "0.05", "--workers", "2", "--dedup", dedup]
    assert subprocess.run(command + ["--output", str(tmp_path / "one")], capture_output=True).returncode == 0

    out = tmp_path / "tasks"
    state = task_dir(out, 1, 2) / "state.json"
    kill_once_saved(command + ["--output", str(out), "--task", "1", "--num-tasks", "2"], state, linger=0)
    assert not (task_dir(out, 1, 2) / "done.json").exists(), "the task finished before the kill: a larger corpus"
    saved = json.loads(state.read_text())["documents"]
    assert saved > 0

    for task in (0, 1):
        done = subprocess.run(command + ["--output", str(out), "--task", str(task), "--num-tasks", "2"],
                              capture_output=True, text=True)
        assert done.returncode == 0 and f"task {task} of 2 done" in done.stdout, done.stderr
    assert subprocess.run([*command[:4], "--merge", str(out)], capture_output=True).returncode == 0
    assert dataset_bytes(out) == dataset_bytes(tmp_path / "one")
    dropped = json.loads((out / "manifest.json").read_text())["counts"]["duplicate_documents"]
    assert dropped == (1000 if dedup == "exact" else 0)


def test_a_merge_with_a_task_missing_or_unfinished_is_refused_by_name(inputs, tmp_path, capsys):
    out = tmp_path / "tasks"
    for task in (0, 2):
        run_task(PreprocessArgs([str(inputs)], str(out), **ARGS), task, 3)
    capsys.readouterr()
    assert main(["preprocess", "--merge", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"task 1 of 3 has not run ({task_dir(out, 1, 3)})" in err, err
    assert (f"Fix: run `megamem preprocess --input {inputs} --output {out} --seq-len 31 --valid-fraction 0.1 "
            f"--shard-size-mb 0.004 --task 1 --num-tasks 3`") in err
    (task_dir(out, 2, 3) / "done.json").unlink()
    run_task(PreprocessArgs([str(inputs)], str(out), **ARGS), 1, 3)
    with pytest.raises(DataError, match="task 2 of 3 has not finished"):
        merge(out)
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()

    run_task(PreprocessArgs([str(inputs)], str(out), **ARGS), 0, 2)
    with pytest.raises(DataError, match="belongs to another split of the work"):
        merge(out)
    with pytest.raises(DataError, match="holds no preprocessing tasks"):
        merge(tmp_path / "nothing")


def test_a_task_of_other_inputs_is_refused(inputs, tmp_path):
    out = tmp_path / "tasks"
    run_task(PreprocessArgs([str(inputs)], str(out), **ARGS), 0, 2)
    with pytest.raises(DataError, match="holds task 0 of other inputs or arguments"):
        run_task(PreprocessArgs([str(inputs)], str(out), **{**ARGS, "seq_len": 63}), 0, 2)


def test_a_slurm_array_task_finds_its_place(monkeypatch):
    assert task_from_environment(None, None) is None or "SLURM_ARRAY_TASK_ID" in os.environ
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert task_from_environment(None, None) == (1, 3)
    assert task_from_environment(2, 4) == (2, 4) and task_from_environment(None, 5) == (1, 5)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "17")             # `sbatch --array=17` reruns one task of a larger job
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
    with pytest.raises(DataError, match="pass --num-tasks N"):
        task_from_environment(None, None)
    assert task_from_environment(None, 64) == (17, 64)
    with pytest.raises(DataError, match="give both"):
        task_from_environment(3, None)
    with pytest.raises(DataError, match="0 <= task < num-tasks"):
        task_from_environment(3, 3)
