"""Process groups of a heterogeneous job: each vendor's collectives on its own backend, and
only gloo groups (the bridges) spanning vendors.

Inside device group g (ranks laid out stage × dp × tp, tp innermost):
  local   all of g's ranks (point-to-point between g's own stages)
  pp/dp/tp the mesh dimensions, as in the homogeneous mesh, on g's backend
  stage   every rank of one stage of g (broadcast after a cross-vendor gradient sum)
Across device groups, always gloo on host tensors:
  bridge-pp    the ranks of stages b and b+1, for a boundary whose two sides differ in vendor
  bridge-dp    one leader per group holding stage s, when several groups hold it
  bridge-norm  one rank per stage, to sum gradient-norm squares (see HeteroContext.group)
The world group (init) is gloo too, and carries only host values (loss, speeds, barriers).

Every rank walks the same list of group specs in the same order and calls new_group for
each (torch names groups by a counter every rank must advance alike). A non-member gets
NON_GROUP_MEMBER without constructing anything, so a rank never builds another vendor's
backend, which it could not (a CUDA host has no HCCL). (`use_local_synchronization`
would skip the non-member calls, but its group names depend on how many groups each rank
already has, which differs between vendors here, and members would not meet.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from suanli.infra.hetero.layout import HeteroPlan

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class GroupSpec:
    purpose: str               # local | pp | dp | tp | stage | bridge-pp | bridge-dp | bridge-norm
    ranks: tuple[int, ...]
    owner: int | None          # device group index; None for a bridge (gloo, spans groups)
    key: int = -1              # stage or boundary index, where the purpose has one


@dataclass(frozen=True)
class GroupRecord:
    """A group this rank created (for the test that no vendor collective spans vendors)."""

    purpose: str
    ranks: tuple[int, ...]
    backend: str


def group_specs(plan: HeteroPlan) -> list[GroupSpec]:
    """Every group of the job, in one order that every rank computes identically."""
    specs: list[GroupSpec] = []
    for g in plan.groups:
        specs.append(GroupSpec("local", tuple(g.ranks), g.index))
        for s in g.stages:
            for d in range(g.dp):
                specs.append(GroupSpec("tp", tuple(g.rank_at(s, d, t) for t in range(g.tp)), g.index, s))
            for t in range(g.tp):
                specs.append(GroupSpec("dp", tuple(g.rank_at(s, d, t) for d in range(g.dp)), g.index, s))
            specs.append(GroupSpec("stage", tuple(g.stage_ranks(s)), g.index, s))
        for d in range(g.dp):
            for t in range(g.tp):
                specs.append(GroupSpec("pp", tuple(g.rank_at(s, d, t) for s in g.stages), g.index))
    for b in range(plan.n_stages - 1):
        ranks = plan.stage_ranks(b) + plan.stage_ranks(b + 1)
        if plan.crosses(ranks):
            specs.append(GroupSpec("bridge-pp", tuple(ranks), None, b))
    for s in range(plan.n_stages):
        holders = plan.holders(s)
        if len(holders) > 1:
            specs.append(GroupSpec("bridge-dp", tuple(g.rank_at(s, 0, 0) for g in holders), None, s))
    for ranks in norm_partition(plan) or []:
        specs.append(GroupSpec("bridge-norm", tuple(ranks), None))
    return specs


def norm_partition(plan: HeteroPlan) -> list[list[int]] | None:
    """Groups of one rank per stage covering every rank, or None when stages have different
    rank counts (then no such partition exists)."""
    per_stage = [plan.stage_ranks(s) for s in range(plan.n_stages)]
    if len({len(r) for r in per_stage}) != 1:
        return None
    return [[ranks[i] for ranks in per_stage] for i in range(len(per_stage[0]))]


@dataclass
class HeteroGroups:
    """This rank's process groups and mesh."""

    plan: HeteroPlan
    rank: int
    mesh: DeviceMesh                          # this rank's device group: ("pp", "dp", "tp")
    local: dist.ProcessGroup
    dp: dist.ProcessGroup
    tp: dist.ProcessGroup
    stage: dist.ProcessGroup
    bridges_pp: dict[int, dist.ProcessGroup] = field(default_factory=dict)   # boundary -> group
    bridge_dp: dist.ProcessGroup | None = None
    norm: dist.ProcessGroup | None = None
    records: list[GroupRecord] = field(default_factory=list)


def build_groups(plan: HeteroPlan, rank: int, device_type: str, backend: str, timeout=None) -> HeteroGroups:
    """Create this rank's groups (every rank calls this, in the same order)."""
    me = plan.group_of(rank)
    stage, d, t = me.coords(rank)
    made: dict[tuple, object] = {}
    records: list[GroupRecord] = []
    mine: dict[tuple, dist.ProcessGroup] = {}
    kw = {"timeout": timeout} if timeout is not None else {}
    for spec in group_specs(plan):
        # One communicator per rank set and owner, however many roles it plays; decided
        # from the spec alone so every rank skips the same calls.
        key = (spec.ranks, spec.owner is None)
        member = rank in spec.ranks
        if key not in made:
            be = ("gloo" if spec.owner is None else backend) if member else None
            # sort_ranks=False: a group rank is the position in the layout (the mesh agrees).
            made[key] = dist.new_group(list(spec.ranks), backend=be, sort_ranks=False, **kw)
        if member:
            records.append(GroupRecord(spec.purpose, spec.ranks, dist.get_backend(made[key])))
            mine[(spec.purpose, spec.key)] = made[key]

    mesh_ranks = torch.tensor(me.ranks, dtype=torch.int).view(me.pp, me.dp, me.tp)
    mesh = DeviceMesh.from_group([mine[("pp", -1)], mine[("dp", stage)], mine[("tp", stage)]], device_type,
                                 mesh=mesh_ranks, mesh_dim_names=MESH_DIMS)
    return HeteroGroups(
        plan, rank, mesh, mine[("local", -1)], mine[("dp", stage)], mine[("tp", stage)], mine[("stage", stage)],
        bridges_pp={k: pg for (p, k), pg in mine.items() if p == "bridge-pp"},
        bridge_dp=mine.get(("bridge-dp", stage)), norm=mine.get(("bridge-norm", -1)), records=records)


__all__ = ["GroupRecord", "GroupSpec", "HeteroGroups", "MESH_DIMS", "build_groups", "group_specs", "norm_partition"]
