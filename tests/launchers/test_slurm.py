"""The SLURM launcher, for real: a one-node cluster on 127.0.0.1 runs launchers/slurm/pretrain.sbatch.

Installs Debian's slurmctld, slurmd, slurm-client and munge when missing (CI runs
as root), starts munged, slurmctld and slurmd with state, spool, sockets and logs
in a temporary directory (no systemd, no cgroups), submits 2 ranks of cpu-smoke,
polls `scontrol show job` until the job ends, checks that it trained and wrote a
checkpoint, and stops the daemons by their PIDs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamem.ports import free_port
from tests.paths import REPO

pytestmark = pytest.mark.slow          # every test here takes more than 30 s

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it needs root (apt-get install " + " ".join(PACKAGES) + ")")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   capture_output=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster, one for the module's jobs; yields the environment that points its clients at
    it."""
    ensure_installed()
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir(parents=True)
    (root / "spool").mkdir()
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key = root / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    memory_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.9)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=megamemtest", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/munge", f"AuthInfo=socket={root / 'munge.socket'}", "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2", "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    env = dict(os.environ, SLURM_CONF=str(conf))
    subprocess.run(["munged", "--force", f"--socket={root / 'munge.socket'}", f"--key-file={key}",
                    f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                    f"--seed-file={root / 'munge.seed'}"], check=True)
    daemons = [subprocess.Popen([daemon, "-D", *extra, "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
               for daemon, extra in (("slurmctld", ["-i"]), ("slurmd", []))]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the test cluster did not come up: {(root / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        for daemon in daemons:
            os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
        munged_pid = root / "munged.pid"
        if munged_pid.exists():
            os.kill(int(munged_pid.read_text()), signal.SIGTERM)


def wait_for(job: str, env: dict, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} did not finish within {timeout} s")


@pytest.mark.parametrize("mode, tasks_per_node, layout, described", [
    ("deepspeed", 1, "", "on 2 rank(s) (dp=2"),
    ("srun", 2, "parallel.pp=2", "on 2 rank(s) (pp=2, dp=1"),
])
def test_sbatch_trains_two_ranks_and_checkpoints(cluster, shards, tmp_path, mode, tasks_per_node, layout, described):
    """deepspeed: one task per node runs the deepspeed launcher, data-parallel; srun: one task per rank, two
    pipeline stages."""
    run = tmp_path / "run"
    settings = (f"data.path={shards} run.dir={run} train.steps=6 train.global_batch_size=16 logging.interval=2 "
                f"data.num_workers=0 {layout}")
    env = dict(cluster, MEGAMEM_CONFIG="configs/cpu-smoke.yaml", MEGAMEM_SET=settings, GPUS_PER_NODE="2",
               MEGAMEM_MODE=mode, MEGAMEM_VENV=str(Path(sys.executable).parents[1]), OMP_NUM_THREADS="1",
               MASTER_PORT=str(free_port()))
    output = tmp_path / "job.out"
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--ntasks-per-node={tasks_per_node}",
                                f"--chdir={REPO}", f"--output={output}",
                                str(REPO / "launchers/slurm/pretrain.sbatch")], env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    fields = wait_for(job, cluster, timeout=400)
    log = output.read_text() if output.exists() else "(no job output)"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-4000:]
    assert "2 ranks per node" in log and described in log, log[-4000:]
    assert (run / "checkpoints" / "step-00000006" / "megamem.json").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6]


PREEMPTED_STEPS = 40        # requeued at step 5 or so, well before the end


def test_preempted_job_checkpoints_and_its_requeued_run_resumes(cluster, shards, tmp_path):
    """`scontrol requeue` terminates the job as a preemption does (SIGTERM, then SIGKILL after KillWait) and queues it
    again; --requeue in the script allows that, and the rerun resumes from the checkpoint written on SIGTERM."""
    run = tmp_path / "run"
    settings = (f"data.path={shards} run.dir={run} train.steps={PREEMPTED_STEPS} train.global_batch_size=16 "
                f"logging.interval=1 "
                f"data.num_workers=0 checkpoint.interval=1000 train.eval_interval=1000")
    env = dict(cluster, MEGAMEM_CONFIG="configs/cpu-smoke.yaml", MEGAMEM_SET=settings, GPUS_PER_NODE="2",
               MEGAMEM_VENV=str(Path(sys.executable).parents[1]), OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    output = tmp_path / "job.out"
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--chdir={REPO}", f"--output={output}",
                                str(REPO / "launchers/slurm/pretrain.sbatch")], env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 6):
        time.sleep(0.2)
    requeue = subprocess.run(["scontrol", "requeue", job], env=cluster, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    release_when_pending(job, cluster)          # Slurm delays a requeued job's start by about two minutes
    fields = wait_for(job, cluster, timeout=600)
    log = output.read_text() if output.exists() else "(no job output)"
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-4000:]
    assert "stopping at step" in log and "resumed from" in log and "(restart 1)" in log, log[-4000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == PREEMPTED_STEPS and sorted(set(steps)) == list(range(0, PREEMPTED_STEPS + 1))
    assert (run / "checkpoints" / f"step-{PREEMPTED_STEPS:08d}" / "megamem.json").is_file()


def release_when_pending(job: str, env: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        if "JobState=PENDING" in text:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
            return
        time.sleep(0.5)
    pytest.fail(f"job {job} did not return to the queue within {timeout} s")


def test_preprocess_array_and_merge_equal_one_task(cluster, tmp_path):
    """`sbatch --array=0-2 launchers/slurm/preprocess.sbatch`, then the merge job after it (afterok), write the
    dataset `megamem preprocess` writes in one task, byte for byte."""
    from tests.data_tools.conftest import documents

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(150, seed=i)))
    options = ["--seq-len", "63", "--shard-size-mb", "0.01", "--valid-fraction", "0.05"]
    one = subprocess.run([sys.executable, "-m", "megamem.cli.main", "preprocess", "--input", f"{corpus}/*.jsonl",
                          "--output", str(tmp_path / "one"), *options], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    out = tmp_path / "tasks"
    env = dict(cluster, MEGAMEM_INPUT=f"{corpus}/*.jsonl", MEGAMEM_OUTPUT=str(out), MEGAMEM_ARGS=" ".join(options),
               MEGAMEM_VENV=str(Path(sys.executable).parents[1]), OMP_NUM_THREADS="1")
    script = str(REPO / "launchers/slurm/preprocess.sbatch")
    submit = ["sbatch", "--parsable", f"--chdir={REPO}"]
    tasks = subprocess.run([*submit, "--array=0-2", f"--output={tmp_path}/task-%a.out", script], env=env,
                           capture_output=True, text=True)
    assert tasks.returncode == 0, tasks.stderr
    array = tasks.stdout.strip().split(";")[0]
    merged = subprocess.run([*submit, f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes",
                             f"--output={tmp_path}/merge.out", script], env=env, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    fields = wait_for(merged.stdout.strip().split(";")[0], cluster, timeout=300)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", logs[-4000:]
    assert all(f"runs task {i} of 3" in logs for i in range(3)) and "merges the tasks" in logs, logs[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir()) and "manifest.json" in files
    assert all((out / name).read_bytes() == (tmp_path / "one" / name).read_bytes() for name in files)
