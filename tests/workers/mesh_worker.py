"""Rank body for test_init: join via suanli.init, report coordinates, all-reduce on each sub-mesh."""

import json
import sys

import torch
import torch.distributed as dist

import suanli
from suanli.infra.distributed import MESH_DIMS

pp, tp, dp_replicate = (int(x) for x in sys.argv[1:4])
ctx = suanli.init(suanli.ParallelConfig(tp=tp, pp=pp, dp_replicate=dp_replicate, dp_shard=-1), timeout_s=60)
sums = {}
for dim in MESH_DIMS:
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t, group=ctx.group(dim))
    sums[dim] = t.item()
dp = torch.tensor([float(ctx.rank)])
dist.all_reduce(dp, group=ctx.dp_mesh.get_group())
sums["dp"] = dp.item()
print("RESULT " + json.dumps({"rank": ctx.rank, "coords": ctx.coordinates(), "dp_rank": ctx.dp_rank,
                              "dp_size": ctx.dp_size, "sums": sums, "backend": dist.get_backend()}), flush=True)
suanli.shutdown()
