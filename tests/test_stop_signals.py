"""Stop signals: the first asks for a checkpoint, a second Ctrl-C aborts, DataLoader workers ignore them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.paths import REPO

SCRIPT = """
import sys, time
from megamem.stop_signals import StopRequest
stop = StopRequest().install()
print("ready", flush=True)
while not stop.requested:
    time.sleep(0.01)
print("requested", stop.signal_name, flush=True)
time.sleep(60)
"""


def _started():
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    return process


def test_first_signal_is_recorded_and_second_ctrl_c_aborts():
    process = _started()
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline() == "requested SIGINT\n"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    assert "second Ctrl-C: aborting now" in process.stderr.read()


def test_only_a_second_ctrl_c_aborts():
    """SLURM may signal twice, and a Ctrl-C after a SIGTERM is the first Ctrl-C."""
    process = _started()
    process.send_signal(signal.SIGUSR1)
    assert process.stdout.readline() == "requested SIGUSR1\n"
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None
    process.kill()
    process.wait()


def test_dataloader_workers_outlive_a_signal_to_them(tmp_path):
    """A worker that died of SIGTERM would end its rank with 'DataLoader worker exited unexpectedly'; one that ignores
    it must still not hold the interpreter's exit (which sends workers SIGTERM and waits for them)."""
    script = """
import os, signal, sys, time
import psutil
from megamem.data_tools.loader import TrainLoader
from megamem.data_tools.shards import load_manifest
from megamem.stop_signals import StopRequest
stop = StopRequest().install()
manifest = load_manifest(sys.argv[1])
loader = TrainLoader([manifest], [1.0], 2, 0, 0, 1, num_workers=2)
first = next(loader)
workers = psutil.Process().children()
assert len(workers) == 2, workers
for worker in workers:
    worker.send_signal(signal.SIGTERM)
    worker.send_signal(signal.SIGINT)
time.sleep(0.5)
for _ in range(20):
    next(loader)
assert all(w.is_running() for w in workers)
print("ok", stop.requested, flush=True)
"""                                     # and the interpreter's exit shuts them down (TrainLoader.close at exit)
    from megamem.data_tools.preprocess import PreprocessArgs, preprocess
    from tests.data_tools.conftest import documents

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(300)))
    data = tmp_path / "data"
    preprocess(PreprocessArgs([str(corpus)], str(data), seq_len=32))
    result = subprocess.run([sys.executable, "-c", script, str(data)], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0 and result.stdout == "ok False\n", result.stderr[-3000:]
