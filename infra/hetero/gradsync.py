"""Gradient synchronisation and the gradient norm in a heterogeneous job.

The loss of every micro-batch is already divided by the *global* token count, so a
stage's gradient is the plain sum over its replicas:

1. inside a device group: all-reduce (sum) over the group's dp ranks, on its own backend;
2. across device groups holding the same stage (data parallelism across vendors): each
   holder's leader (dp 0, tp 0) assembles the full, unsharded gradient (the groups may
   shard it differently: different tp), the leaders sum it on the host through a gloo
   bridge (with the low-bandwidth reducer, so bf16 / int8 compression applies), and each
   leader broadcasts the result to its stage's ranks, which keep their own shard.

A layout that keeps data parallelism inside each vendor (every stage held by one group)
only ever does step 1; step 2 is what cross-vendor data parallelism costs.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Replicate, Shard

from suanli.infra.hetero.bridge import LinkStats


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:  # an unused parameter still has to take part in every collective
            p.grad = torch.zeros_like(p)
        elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            # A replicated weight under sequence parallel gets a Partial (unreduced) gradient;
            # reduce it inside the tp group first so every gradient is Shard or Replicate.
            p.grad = p.grad.redistribute(p.grad.device_mesh, p.placements)
    return [p.grad for p in params]


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` laid out as the DTensor `like` (even splits only)."""
    if not isinstance(like, DTensor):
        return full
    piece = full
    mesh = like.device_mesh
    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            piece = piece.chunk(mesh.size(dim), dim=placement.dim)[mesh.get_local_rank(dim)]
        elif not isinstance(placement, Replicate):
            raise ValueError(f"hetero gradient sync: placement {placement} is not supported")
    return piece


class GradSync:
    def __init__(self, params: list[torch.nn.Parameter], groups, leader: bool, dp_size: int,
                 device: torch.device, codec: str = "fp32") -> None:
        self.params = params
        self.groups = groups
        self.leader = leader
        self.dp_size = dp_size
        self.device = device
        self.codec = codec
        self.stats = LinkStats()
        plan = groups.plan
        # Every rank of a stage held by several groups takes part (not only the leaders).
        self.across = len(plan.holders(plan.group_of(groups.rank).coords(groups.rank)[0])) > 1
        self._reducer = None
        if groups.bridge_dp is not None and leader:
            from suanli.infra.lowbw.allreduce import FlatReducer

            self._reducer = FlatReducer(groups.bridge_dp, codec)

    @torch.no_grad()
    def __call__(self) -> None:
        grads = _grads(self.params)
        if self.dp_size > 1:
            local = [_local(g) for g in grads]
            flat = _flatten_dense_tensors(local)
            dist.all_reduce(flat, group=self.groups.dp)
            for t, v in zip(local, _unflatten_dense_tensors(flat, local)):
                t.copy_(v)
        if self.across:
            self._across_vendors(grads)

    def _across_vendors(self, grads: list[torch.Tensor]) -> None:
        g = self.groups
        # Only replica 0 assembles the full gradient (a collective over its tp ranks); the
        # others receive the summed result in the broadcast below.
        if g.mesh.get_local_rank("dp") == 0:
            fulls = [x.full_tensor() if isinstance(x, DTensor) else x.clone() for x in grads]
        else:
            fulls = [torch.empty(x.shape, dtype=x.dtype, device=self.device) for x in grads]
        flat = _flatten_dense_tensors(fulls)
        if self.leader:
            from suanli.infra.lowbw.allreduce import average_tensors_

            start = time.perf_counter()
            host = flat.to("cpu", copy=True) if flat.device.type != "cpu" else flat
            n = dist.get_world_size(g.bridge_dp)
            self.stats.bytes_sent += average_tensors_(self._reducer, [host], key="hetero-grads")
            host.mul_(n)   # the reducer averages; replicas' gradients must be summed
            if host is not flat:
                flat.copy_(host)
            self.stats.wait_s += time.perf_counter() - start   # the whole host all-reduce
            self.stats.messages += 1
        if dist.get_world_size(g.stage) > 1:
            dist.broadcast(flat, src=self._leader_rank(), group=g.stage)
        for x, full in zip(grads, _unflatten_dense_tensors(flat, fulls)):
            _local(x).copy_(_shard_of(full, x))

    def _leader_rank(self) -> int:
        me = self.groups.plan.group_of(self.groups.rank)
        stage = me.coords(self.groups.rank)[0]
        return me.rank_at(stage, 0, 0)


@torch.no_grad()
def stage_grad_sq(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Squared L2 norm of this stage's whole gradient (DTensor shards reduced), on the host."""
    from suanli.infra.optim import total_grad_norm

    return total_grad_norm(params, None) ** 2


@torch.no_grad()
def global_grad_norm(params: list[torch.nn.Parameter], ranks_holding_my_stage: int) -> float:
    """The whole model's gradient norm, on every rank, for any layout: each rank holds its
    stage's full squared norm, so weighting it by 1 / (ranks holding that stage) and summing
    over the world (gloo, one host scalar) counts every stage once."""
    sq = stage_grad_sq(params) / ranks_holding_my_stage
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return float(math.sqrt(max(sq.item(), 0.0)))


__all__ = ["GradSync", "global_grad_norm", "stage_grad_sq"]
