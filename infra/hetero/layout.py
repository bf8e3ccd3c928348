"""The heterogeneous layout, as plain data: device groups, which rank runs which stage
replica, which rows of the global batch each replica trains on, and which piece of which
activation crosses each stage boundary.

No process groups here. Every rank computes the same plan from the same config, so a
sender and its receiver agree on every message (shape, order, tag) without exchanging
any metadata, and the whole plan is testable in one process.

Inside a device group the ranks are laid out (stage, dp, tp) with tp innermost, as in the
homogeneous mesh. A stage may be held by several groups (data parallelism across vendors):
its replicas are then the union of every holder's dp replicas, in group order, and the
global batch is split among them by weight (a faster device takes more rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

GROUP_KEYS = ("device", "ranks", "nodes", "tp", "dp", "stages", "micro_batch", "speed")


class LayoutError(ValueError):
    """A [hetero] setting that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class DeviceGroup:
    """One vendor's share of the job: its ranks run `stages` with their own tp and dp."""

    index: int
    device: str
    ranks: tuple[int, ...]
    tp: int
    dp: int
    stages: tuple[int, ...]
    micro_batch: int = 0        # rows per micro-batch; 0 = train.micro_batch
    speed: float = 0.0          # relative per-device throughput; 0 = unknown (measure or table)
    nodes: tuple[str, ...] = ()  # host names, when the group was given by node list

    @property
    def where(self) -> str:
        return f"hetero.groups[{self.index}]"

    @property
    def pp(self) -> int:
        return len(self.stages)

    def rank_at(self, stage: int, d: int, t: int) -> int:
        return self.ranks[((stage - self.stages[0]) * self.dp + d) * self.tp + t]

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(global stage, dp index, tp index) of `rank` in this group."""
        i = self.ranks.index(rank)
        p, rest = divmod(i, self.dp * self.tp)
        d, t = divmod(rest, self.tp)
        return self.stages[0] + p, d, t

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank_at(stage, d, t) for d in range(self.dp) for t in range(self.tp)]


def _ranks_value(v, where: str) -> tuple[int, ...]:
    if isinstance(v, str):  # "0-3" or "4"
        try:
            lo, _, hi = v.partition("-")
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise LayoutError(f"{where}.ranks: {v!r} is not a rank range; write [0, 1, 2, 3] or \"0-3\"") from None
        return tuple(range(lo, hi + 1))
    ok = isinstance(v, list) and v and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in v)
    if not ok:
        raise LayoutError(f"{where}.ranks: expected a non-empty list of ranks >= 0 or a range \"0-3\", got {v!r}")
    if len(set(v)) != len(v):
        raise LayoutError(f"{where}.ranks: {v} lists a rank twice")
    return tuple(v)


def _int(d: dict, key: str, where: str, default: int, low: int) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise LayoutError(f"{where}.{key}: expected an integer >= {low}, got {v!r}")
    return v


def parse_groups(raw, known_devices: tuple[str, ...] | None = None) -> list[DeviceGroup]:
    """[[hetero.groups]] tables → DeviceGroups, checking each field on its own."""
    if not isinstance(raw, list) or not all(isinstance(g, dict) for g in raw):
        raise LayoutError("hetero.groups: expected an array of tables ([[hetero.groups]] device = \"cuda\", "
                          f"ranks = [0, 1], tp = 1, stages = [0]), got {raw!r}")
    groups = []
    for i, d in enumerate(raw):
        where = f"hetero.groups[{i}]"
        unknown = sorted(set(d) - set(GROUP_KEYS))
        if unknown:
            raise LayoutError(f"{where}: unknown key(s) {unknown}; known keys: {list(GROUP_KEYS)}")
        device = d.get("device")
        if not isinstance(device, str) or not device:
            raise LayoutError(f"{where}.device: required, the device type of this group (e.g. \"cuda\", \"npu\")")
        if known_devices is not None and device not in known_devices:
            raise LayoutError(f"{where}.device: '{device}' is not a known accelerator; choose one of "
                              f"{', '.join(known_devices)}")
        if ("ranks" in d) == ("nodes" in d):
            raise LayoutError(f"{where}: give exactly one of ranks (e.g. [0, 1] or \"0-7\") or nodes (host names)")
        ranks, nodes = (), ()
        if "ranks" in d:
            ranks = _ranks_value(d["ranks"], where)
        else:
            if not isinstance(d["nodes"], list) or not d["nodes"] or not all(isinstance(n, str) for n in d["nodes"]):
                raise LayoutError(f"{where}.nodes: expected a non-empty list of host names, got {d['nodes']!r}")
            nodes = tuple(d["nodes"])
        stages = d.get("stages")
        if (not isinstance(stages, list) or not stages
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in stages)):
            raise LayoutError(f"{where}.stages: required, a non-empty list of pipeline stage indices, e.g. [0, 1]")
        if stages != list(range(stages[0], stages[0] + len(stages))):
            raise LayoutError(f"{where}.stages: {stages} must be consecutive and ascending, e.g. [2, 3]; a group "
                              f"runs one contiguous piece of the pipeline")
        tp = _int(d, "tp", where, 1, 1)
        dp = _int(d, "dp", where, 0, 0)
        speed = d.get("speed", 0.0)
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or speed < 0:
            raise LayoutError(f"{where}.speed: expected a number >= 0 (relative device throughput, 0 = unknown), "
                              f"got {speed!r}")
        g = DeviceGroup(i, device, ranks, tp, dp, tuple(stages), _int(d, "micro_batch", where, 0, 0), float(speed),
                        nodes)
        groups.append(_fill_dp(g) if ranks else g)
    return groups


def _fill_dp(g: DeviceGroup) -> DeviceGroup:
    """Derive dp from the rank count, or check the three degrees multiply to it."""
    per_replica = g.pp * g.tp
    n = len(g.ranks)
    if g.dp == 0:
        if n % per_replica:
            raise LayoutError(f"{g.where}: {n} ranks are not divisible by len(stages) x tp = {g.pp} x {g.tp} = "
                              f"{per_replica}; use a rank count that is a multiple of {per_replica}, or change tp")
        return replace(g, dp=n // per_replica)
    if g.pp * g.tp * g.dp != n:
        raise LayoutError(f"{g.where}: len(stages) x tp x dp = {g.pp} x {g.tp} x {g.dp} = {g.pp * g.tp * g.dp} "
                          f"but the group has {n} ranks; fix dp (or leave it out to derive it)")
    return g


def resolve_nodes(groups: list[DeviceGroup], hostnames: list[str]) -> list[DeviceGroup]:
    """Groups given by node list get the ranks running on those hosts (in rank order)."""
    out = []
    for g in groups:
        if g.nodes:
            ranks = tuple(r for r, h in enumerate(hostnames) if h in g.nodes)
            missing = sorted(set(g.nodes) - set(hostnames))
            if missing:
                raise LayoutError(f"{g.where}.nodes: no rank runs on {missing}; hosts in this job: "
                                  f"{sorted(set(hostnames))}")
            g = _fill_dp(replace(g, ranks=ranks))
        out.append(g)
    return out


def check_layout(groups: list[DeviceGroup], n_layers: int, world_size: int | None = None) -> int:
    """Cross-group checks (rank overlap, stage coverage); returns the number of stages."""
    if not groups:
        raise LayoutError("hetero.groups: empty; add at least one [[hetero.groups]] table")
    owner: dict[int, int] = {}
    for g in groups:
        for r in g.ranks:
            if r in owner:
                raise LayoutError(f"{g.where}.ranks: rank {r} is already in hetero.groups[{owner[r]}]; "
                                  f"each rank belongs to exactly one device group")
            owner[r] = g.index
    if owner and sorted(owner) != list(range(len(owner))):
        gaps = sorted(set(range(max(owner) + 1)) - set(owner))
        raise LayoutError(f"hetero.groups: ranks {gaps} belong to no group; the groups together must hold "
                          f"ranks 0..{max(owner)} with no gaps")
    if world_size is not None and len(owner) != world_size:
        raise LayoutError(f"hetero.groups: the groups hold {len(owner)} ranks but the job has {world_size} "
                          f"processes; launch {len(owner)} processes or change the groups' ranks")
    n_stages = max(g.stages[-1] for g in groups) + 1
    held = {s for g in groups for s in g.stages}
    missing = sorted(set(range(n_stages)) - held)
    if missing:
        raise LayoutError(f"hetero.groups: no group runs stage(s) {missing}; stages 0..{n_stages - 1} must each "
                          f"be in some group's stages")
    if n_stages > n_layers:
        raise LayoutError(f"hetero.groups: {n_stages} pipeline stages but model.n_layers={n_layers}; every stage "
                          f"needs at least one layer")
    return n_stages


def split_rows(total: int, weights: list[float], where: str) -> list[int]:
    """`total` rows split by weight, largest remainder first, at least one each."""
    if total < len(weights):
        raise LayoutError(f"train.global_batch: {total} rows cannot feed the {len(weights)} replicas of {where}; "
                          f"use a global batch of at least {len(weights)}")
    w = [max(x, 1e-12) for x in weights]
    ideal = [total * x / sum(w) for x in w]
    rows = [max(1, int(v)) for v in ideal]
    while sum(rows) > total:  # the max(1, .) floors can overshoot: take from the most over-served
        i = max((j for j in range(len(rows)) if rows[j] > 1), key=lambda j: rows[j] - ideal[j])
        rows[i] -= 1
    order = sorted(range(len(rows)), key=lambda j: ideal[j] - rows[j], reverse=True)
    for j in range(total - sum(rows)):
        rows[order[j % len(order)]] += 1
    return rows


@dataclass(frozen=True)
class Replica:
    """One copy of one stage: `tp` ranks that train rows [lo, hi) of the global batch."""

    stage: int
    group: int                        # index into the plan's groups
    dp: int
    lo: int
    hi: int
    micro: tuple[tuple[int, int], ...]  # absolute row ranges of its micro-batches, in order


@dataclass(frozen=True)
class Message:
    """One piece of one activation crossing boundary b (stage b → b+1); its gradient goes back
    the same way. rows: global batch rows; cols: sequence positions."""

    boundary: int
    index: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    src: int
    dst: int
    src_micro: int
    dst_micro: int


@dataclass(frozen=True)
class Role:
    """What one rank does in the plan."""

    rank: int
    group: DeviceGroup
    stage: int
    dp: int
    tp: int
    replica: Replica
    cols: tuple[int, int]             # the sequence positions this rank holds between blocks


@dataclass
class HeteroPlan:
    groups: list[DeviceGroup]
    n_stages: int
    layers: list[int]                 # transformer layers per stage
    global_batch: int
    seq_len: int
    weights: dict[int, float] = field(default_factory=dict)   # per group: batch-share weight per replica
    default_micro_batch: int = 1

    def __post_init__(self) -> None:
        for g in self.groups:
            if self.seq_len % g.tp:
                raise LayoutError(f"{g.where}.tp: {g.tp} does not divide train.seq_len={self.seq_len}; sequence "
                                  f"parallel splits every sequence evenly across the tp ranks")

    def holders(self, stage: int) -> list[DeviceGroup]:
        return [g for g in self.groups if stage in g.stages]

    def micro_batch(self, g: DeviceGroup) -> int:
        return g.micro_batch or self.default_micro_batch

    @cached_property
    def replicas(self) -> dict[int, list[Replica]]:
        out = {}
        for s in range(self.n_stages):
            owners = [(g, d) for g in self.holders(s) for d in range(g.dp)]
            rows = split_rows(self.global_batch, [self.weights.get(g.index, 1.0) for g, _ in owners], f"stage {s}")
            reps, lo = [], 0
            for (g, d), n in zip(owners, rows):
                mb = self.micro_batch(g)
                micro = tuple((a, min(a + mb, lo + n)) for a in range(lo, lo + n, mb))
                reps.append(Replica(s, g.index, d, lo, lo + n, micro))
                lo += n
            out[s] = reps
        return out

    def cols(self, g: DeviceGroup, t: int) -> tuple[int, int]:
        step = self.seq_len // g.tp
        return t * step, (t + 1) * step

    def boundary(self, b: int) -> list[Message]:
        return self._messages[b]

    @cached_property
    def _messages(self) -> dict[int, list[Message]]:
        return {b: self._boundary(b) for b in range(self.n_stages - 1)}

    def _boundary(self, b: int) -> list[Message]:
        msgs: list[Message] = []
        receivers = [(r, k, m) for r in self.replicas[b + 1] for k, m in enumerate(r.micro)]
        for sr in self.replicas[b]:
            sg = self.groups[sr.group]
            for sk, (lo, hi) in enumerate(sr.micro):
                for rr, rk, (lo2, hi2) in receivers:
                    rows = (max(lo, lo2), min(hi, hi2))
                    if rows[0] >= rows[1]:
                        continue
                    rg = self.groups[rr.group]
                    for t1 in range(sg.tp):
                        c1 = self.cols(sg, t1)
                        for t2 in range(rg.tp):
                            c2 = self.cols(rg, t2)
                            cols = (max(c1[0], c2[0]), min(c1[1], c2[1]))
                            if cols[0] < cols[1]:
                                msgs.append(Message(b, len(msgs), rows, cols, sg.rank_at(b, sr.dp, t1),
                                                    rg.rank_at(b + 1, rr.dp, t2), sk, rk))
        return msgs

    def group_of(self, rank: int) -> DeviceGroup:
        for g in self.groups:
            if rank in g.ranks:
                return g
        raise LayoutError(f"rank {rank} is in no hetero.groups entry")

    def role(self, rank: int) -> Role:
        g = self.group_of(rank)
        stage, d, t = g.coords(rank)
        rep = next(r for r in self.replicas[stage] if r.group == g.index and r.dp == d)
        return Role(rank, g, stage, d, t, rep, self.cols(g, t))

    def stage_ranks(self, stage: int) -> list[int]:
        """Every rank holding `stage`, in replica order (group, dp, tp)."""
        return [r for g in self.holders(stage) for r in g.stage_ranks(stage)]

    def crosses(self, ranks) -> bool:
        """Do `ranks` span more than one device group?"""
        return len({self.group_of(r).index for r in ranks}) > 1

    def describe(self) -> dict:
        return {"n_stages": self.n_stages, "layers": list(self.layers),
                "groups": [{"device": g.device, "ranks": list(g.ranks), "tp": g.tp, "dp": g.dp,
                            "stages": list(g.stages), "micro_batch": self.micro_batch(g),
                            "weight": self.weights.get(g.index, 1.0)} for g in self.groups],
                "rows": {s: [[r.group, r.dp, r.hi - r.lo] for r in reps] for s, reps in self.replicas.items()}}


__all__ = ["DeviceGroup", "HeteroPlan", "LayoutError", "Message", "Replica", "Role", "parse_groups",
           "resolve_nodes", "check_layout", "split_rows", "GROUP_KEYS"]
