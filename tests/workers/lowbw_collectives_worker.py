"""Rank body for test_lowbw_collectives: the all-reduces of suanli.infra.lowbw against
torch's plain all-reduce, on 4 ranks treated as 2 "nodes" × 2 (comm.node_size = 2)."""

import json
import os
import sys

import torch
import torch.distributed as dist

import suanli
from suanli.infra.lowbw.allreduce import (FlatReducer, HierarchicalReducer, build_hierarchy, data_parallel_groups,
                                          node_ids)

ctx = suanli.init(suanli.ParallelConfig(dp_replicate=4, dp_shard=1), timeout_s=60)
rank, world = ctx.rank, ctx.world_size
groups = data_parallel_groups(ctx.mesh)
out = {"groups": groups}


def true_mean(x: torch.Tensor) -> torch.Tensor:
    t = x.clone()
    dist.all_reduce(t)
    return t / world


# 1. hierarchical == flat. Integer multiples of 4 make every partial sum and division exact,
# so any reordering of the sum gives bit-identical results; random data must agree to rounding.
h = build_hierarchy(groups, node_ids(world, node_size=2), rank)
out["hier_shape"] = [dist.get_world_size(h.intra), dist.get_world_size(h.inter), h.ranks_per_node, h.n_nodes]
hier = HierarchicalReducer(h.intra, FlatReducer(h.inter, "fp32"))
flat = FlatReducer(None, "fp32")
gen = torch.Generator().manual_seed(100 + rank)
ints = torch.randint(-1000, 1000, (1001,), generator=gen).float() * 4
a, b = ints.clone(), ints.clone()
flat.average_(a)
out["hier_bytes"] = hier.average_(b)
out["flat_bytes"] = FlatReducer(None, "fp32").average_(ints.clone())
out["exact_equal"] = bool(torch.equal(a, b))
x = torch.randn(3001, generator=gen)
a, b = x.clone(), x.clone()
flat.average_(a)
hier.average_(b)
out["random_maxdiff"] = float((a - b).abs().max())
out["random_scale"] = float(a.abs().max())

# hostnames: every rank here is on one host, so one "node" of 4 — still equal to flat.
hh = build_hierarchy(groups, node_ids(world, node_size=0), rank)
c = x.clone()
HierarchicalReducer(hh.intra, FlatReducer(hh.inter, "fp32")).average_(c)
out["hostname_shape"] = [hh.ranks_per_node, hh.n_nodes]
out["hostname_maxdiff"] = float((a - c).abs().max())

# hierarchical with int8 across "nodes" only
d = x.clone()
HierarchicalReducer(h.intra, FlatReducer(h.inter, "int8", 64)).average_(d)
out["hier_int8_maxerr"] = float((a - d).abs().max())

# 2. one int8 all-reduce: error within the two quantization stages' bound
block = 64
x = torch.randn(4096, generator=gen) * (1 + rank)
mean = true_mean(x)
amax_mine = x.view(-1, block).abs().amax(1)
amax_all = amax_mine.clone()
dist.all_reduce(amax_all)                      # sum over ranks of each block's absmax
stage1 = amax_all / world / 254                # mean of the ranks' half-steps
stage2 = mean.view(-1, block).abs().amax(1) / 254 + stage1  # reduced values can be off by stage1 already
y = x.clone()
sent = FlatReducer(None, "int8", block, error_feedback=False).average_(y)
err = (y - mean).abs().view(-1, block).amax(1)
out["int8_err_over_bound"] = float((err / (stage1 + stage2 + 1e-12)).max())
out["int8_bytes"], out["fp32_bytes"] = sent, 2 * (world - 1) * x.numel() * 4 // world
ys = [torch.empty_like(y) for _ in range(world)]
dist.all_gather(ys, y)
out["int8_replicas_identical"] = all(torch.equal(ys[0], t) for t in ys)

# 3. error feedback over steps: one large value per block and small ones below half a
# quantization step, which plain rounding drops every time. The accumulated difference
# between what was delivered and the true means grows linearly without feedback and
# stays bounded (about one step's residual) with it.
T = 40
g = torch.full((1024,), 0.001 * (rank + 1))
g[::block] = 1.0
true = true_mean(g)
for ef in (True, False):
    red = FlatReducer(None, "int8", block, error_feedback=ef)
    acc = torch.zeros_like(g)
    worst = []
    for t in range(T):
        y = g.clone()
        red.average_(y, key="w")
        acc += y - true
        worst.append(float(acc.abs().max()))
    out[f"acc_err_ef_{ef}"] = worst
out["one_step_bound"] = float(2.0 / 254)

if rank == 0:
    print("RESULT " + json.dumps(out), flush=True)
torch.distributed.barrier()  # every check above is done on every rank
# Exit without destroying the process groups: once in many loaded CI runs a rank aborted
# inside gloo's group destructor ("terminate called without an active exception") after
# all checks had passed. Teardown is not what this worker tests.
sys.stdout.flush()
os._exit(0)
