"""Rank body for test_planner: probe_topology on the running gloo job, written to argv[1]."""

import json
import sys

import torch.distributed as dist

import suanli
from suanli.infra.planner import probe_topology

ctx = suanli.init(suanli.ParallelConfig(dp_replicate=2, dp_shard=1), timeout_s=60)
topo = probe_topology(ctx, sizes=(1 << 10, 1 << 16, 1 << 20), iters=3, path=sys.argv[1], node_size=1)
if ctx.rank == 0:
    print("RESULT " + json.dumps(topo), flush=True)
dist.barrier()
suanli.shutdown()
