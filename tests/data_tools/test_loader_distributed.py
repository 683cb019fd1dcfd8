"""Four gloo ranks, 2 data-parallel x 2 tensor-parallel, reading one dataset."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from megamem.ports import free_port
from tests.data_tools.conftest import documents
from tests.data_tools.test_loader import make_dataset
from tests.paths import REPO


def test_replicas_share_samples_and_data_parallel_ranks_split_the_epoch(tmp_path):
    manifest = make_dataset(tmp_path, "ds", documents(300))
    steps = manifest.samples // 4                           # batch size 2 on 2 replicas: exactly one epoch
    out = tmp_path / "ranks.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="", WORLD_SIZE="")
    env.pop("RANK"), env.pop("WORLD_SIZE")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                             str(free_port()), str(REPO / "tests/data_tools/dist_loader_main.py"),
                             str(manifest.directory), str(steps), str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    by_dp = {}
    for rank in ranks:
        by_dp.setdefault(rank["dp_rank"], []).append(rank["rows"])
    assert sorted(by_dp) == [0, 1]
    for replica in by_dp.values():
        assert replica[0] == replica[1]                     # both tensor-parallel ranks of a replica: identical batches
    first, second = (set(replica[0]) for replica in by_dp.values())
    assert not first & second                               # replicas: disjoint
    everything = {hashlib.sha1(row.tobytes()).hexdigest() for row in _all_rows(manifest)}
    assert len(first) == len(second) == 2 * steps
    assert (first | second == everything if manifest.samples % 4 == 0
            else len(everything - (first | second)) == manifest.samples % 4)


def _all_rows(manifest):
    from megamem.data_tools.shards import read_shard

    for info in manifest.shards:
        yield from read_shard(manifest.directory, info, manifest.seq_len, manifest.dtype)
