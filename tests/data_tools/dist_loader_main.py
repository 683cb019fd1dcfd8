"""Run by torchrun from test_loader_distributed.py: each rank reports what it read."""
import hashlib
import json
import sys

import torch.distributed as dist

from megamem.data_tools.loader import TrainLoader
from megamem.data_tools.shards import load_manifest
from megamem.parallel.state import ParallelState

dataset, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
state = ParallelState.for_world(tp=2, pp=1, world_size=dist.get_world_size(), rank=dist.get_rank())
state.build_groups()
loader = TrainLoader([load_manifest(dataset)], [1.0], 2, 9, state.dp_rank, state.dp, num_workers=1)
rows = [hashlib.sha1(row.numpy().astype("uint16").tobytes()).hexdigest() for _ in range(steps) for row in next(loader)]
everything = [None] * dist.get_world_size()
dist.all_gather_object(everything, {"rank": state.rank, "tp_rank": state.tp_rank, "dp_rank": state.dp_rank,
                                    "rows": rows})
if state.rank == 0:
    with open(out, "w") as handle:
        json.dump(everything, handle)
dist.destroy_process_group()
