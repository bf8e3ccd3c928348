"""The planner's communication side: link classes, the topology file and the probe that
writes it, and the alpha-beta cost of one collective of a given kind.

Topology file (JSON, written by `probe_topology`):

    {"format": "suanli-topology", "version": 1, "source": "probe" | "manual",
     "devices_per_node": 8,
     "links": {"intra_node": {"alpha_s": 4e-06, "bandwidth_gbps": 3600.0},
               "inter_node": {"alpha_s": 2e-05, "bandwidth_gbps": 25.0}},
     "collectives": {"intra_node": {"all_gather": {"alpha_s": ..., "bandwidth_gbps": ...}, ...}},
     "overlap_efficiency": 0.1,
     "measured": {...raw samples...}}

`links` is the back-to-back all-reduce fit of each link class. `bandwidth_gbps` is Gbit/s:
per device for intra_node, per node for inter_node (all of the node's NICs, shared by every
device of the node that talks across nodes at once). `alpha_s` is the latency of one ring
step. `collectives` (optional) refines that per collective kind, measured the way a training
step issues them: each call right after a slice of computation, so the ranks arrive with the
skew and the wake-up delay a step sees, which on CPU processes sharing cores is far above the
back-to-back latency. `overlap_efficiency` (optional, 0..1) is the share of a collective the
backend hides behind concurrent computation (measured; GPUs with their own copy engines
approach 1, gloo on the cores that compute stays near 0).

Cost of one collective of S bytes over n ranks (Hockney's alpha-beta model with the busbw
factors nccl-tests use; S is the all-reduce buffer, the all-gather output, the
reduce-scatter input, the all-to-all buffer, the point-to-point message):
  all_reduce                2(n-1)·alpha + 2(n-1)/n · S·beta
  all_gather, reduce_scatter, all_to_all   (n-1)·alpha + (n-1)/n · S·beta
  p2p                       alpha + S·beta
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOPOLOGY_FORMAT, TOPOLOGY_VERSION = "suanli-topology", 1
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
LINK_CLASSES = ("intra_node", "inter_node")


def ring_steps(kind: str, n: int) -> int:
    return 0 if n <= 1 else {"all_reduce": 2 * (n - 1), "p2p": 1}.get(kind, n - 1)


def bus_factor(kind: str, n: int) -> float:
    return 0.0 if n <= 1 else {"all_reduce": 2 * (n - 1) / n, "p2p": 1.0}.get(kind, (n - 1) / n)


@dataclass(frozen=True)
class Link:
    alpha_s: float          # latency per ring step
    bandwidth_gbps: float   # Gbit/s (bus bandwidth)

    @property
    def beta(self) -> float:
        """Seconds per byte."""
        return 8.0 / (self.bandwidth_gbps * 1e9)

    def cost(self, kind: str, nbytes: float, n: int, concurrent: int = 1, latency_share: float = 1.0) -> float:
        """Seconds for one collective; `concurrent` rings share this link's bandwidth; only
        `latency_share` of the per-step latency is paid (see planner.wait_reclaimed)."""
        if n <= 1 and kind != "p2p":
            return 0.0
        n = max(n, 2)
        return (latency_share * ring_steps(kind, n) * self.alpha_s
                + bus_factor(kind, n) * nbytes * self.beta * concurrent)


@dataclass
class Topology:
    intra: Link
    inter: Link | None
    devices_per_node: int
    source: str = "manual"
    measured: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)          # link class -> kind -> Link
    overlap_efficiency: float | None = None

    def to_dict(self) -> dict:
        links = {"intra_node": asdict(self.intra)}
        if self.inter is not None:
            links["inter_node"] = asdict(self.inter)
        d = {"format": TOPOLOGY_FORMAT, "version": TOPOLOGY_VERSION, "source": self.source,
             "devices_per_node": self.devices_per_node, "links": links}
        if self.kinds:
            d["collectives"] = {c: {k: asdict(v) for k, v in ks.items()} for c, ks in self.kinds.items()}
        if self.overlap_efficiency is not None:
            d["overlap_efficiency"] = self.overlap_efficiency
        d["measured"] = self.measured
        return d


def _link(d: dict, where: str) -> Link:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object with alpha_s and bandwidth_gbps, got {d!r}")
    for k in ("alpha_s", "bandwidth_gbps"):
        v = d.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 \
                or (k == "bandwidth_gbps" and v == 0):
            raise ValueError(f"{where}.{k}: expected a positive number, got {v!r}")
    return Link(float(d["alpha_s"]), float(d["bandwidth_gbps"]))


def topology_from_dict(d: dict, origin: str = "topology") -> Topology:
    if not isinstance(d, dict) or d.get("format") != TOPOLOGY_FORMAT:
        raise ValueError(f"{origin}: not a suanli topology file (expected \"format\": \"{TOPOLOGY_FORMAT}\"); "
                         f"write one with `suanli bench comm --topology-out FILE`")
    if d.get("version") != TOPOLOGY_VERSION:
        raise ValueError(f"{origin}: version {d.get('version')!r} is not supported (this suanli reads "
                         f"version {TOPOLOGY_VERSION})")
    links = d.get("links")
    if not isinstance(links, dict) or "intra_node" not in links:
        raise ValueError(f"{origin}: links.intra_node is missing")
    dpn = d.get("devices_per_node")
    if not isinstance(dpn, int) or dpn < 1:
        raise ValueError(f"{origin}: devices_per_node must be an integer >= 1, got {dpn!r}")
    inter = _link(links["inter_node"], f"{origin}: links.inter_node") if "inter_node" in links else None
    kinds: dict = {}
    for cls, per_kind in (d.get("collectives") or {}).items():
        if cls not in LINK_CLASSES or not isinstance(per_kind, dict):
            raise ValueError(f"{origin}: collectives.{cls}: expected one of {', '.join(LINK_CLASSES)} mapping "
                             f"collective kinds to links")
        for kind, link in per_kind.items():
            if kind not in KINDS:
                raise ValueError(f"{origin}: collectives.{cls}.{kind}: unknown kind; known: {', '.join(KINDS)}")
            kinds.setdefault(cls, {})[kind] = _link(link, f"{origin}: collectives.{cls}.{kind}")
    eff = d.get("overlap_efficiency")
    if eff is not None and (not isinstance(eff, (int, float)) or isinstance(eff, bool) or not 0 <= eff <= 1):
        raise ValueError(f"{origin}: overlap_efficiency: expected a number in [0, 1], got {eff!r}")
    return Topology(_link(links["intra_node"], f"{origin}: links.intra_node"), inter, dpn,
                    str(d.get("source", "manual")), d.get("measured", {}), kinds,
                    None if eff is None else float(eff))


def read_topology(path: str | Path) -> Topology:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--topology: {str(p)!r} not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--topology: {p} is not valid JSON: {e}") from None
    return topology_from_dict(data, str(p))


def write_topology(topo: Topology, path: str | Path) -> None:
    Path(path).write_text(json.dumps(topo.to_dict(), indent=2) + "\n")


def fit_alpha_beta(samples: list[tuple[int, float]], n: int, kind: str = "all_reduce") -> Link:
    """Least-squares fit of t = steps(kind, n)·alpha + bus(kind, n)·S·beta to (bytes S,
    seconds t) samples of one collective kind over n ranks; both kept non-negative."""
    import numpy as np

    if n < 2 or len(samples) < 2:
        raise ValueError("fit_alpha_beta: needs >= 2 ranks and >= 2 message sizes")
    steps, bus = ring_steps(kind, n), bus_factor(kind, n)
    a = np.array([[steps, bus * s] for s, _ in samples], dtype=float)
    t = np.array([max(x, 1e-9) for _, x in samples], dtype=float)
    # Relative residuals: small messages (latency) and large ones (bandwidth) count alike.
    w = 1.0 / t
    coef, *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
    alpha, beta = float(coef[0]), float(coef[1])
    if alpha < 0:   # bandwidth-dominated samples: all of it is bandwidth
        alpha = 0.0
        beta = float(np.sum(a[:, 1] * t * w * w) / np.sum(a[:, 1] ** 2 * w * w))
    if beta <= 0:   # latency-dominated samples: bandwidth from the largest message alone
        s, x = max(samples)
        beta = max(x - steps * alpha, 1e-12) / (bus * s)
    return Link(alpha, 8.0 / beta / 1e9)


# ---------------------------------------------------------------- the probe


def _agreed_max(x: float, group) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # a collective is done when its last rank is
    return float(t.item())


def _call(kind: str, group, nbytes: int, device, mesh=None):
    """A zero-argument callable issuing one `kind` collective of S = nbytes over `group`; with
    a 1-D `mesh` (over the same ranks) all-gather, reduce-scatter and all-reduce go the way
    tensor parallel issues them, as DTensor redistributions (functional collectives)."""
    import torch
    import torch.distributed as dist

    n, me = dist.get_world_size(group), dist.get_rank(group)
    numel = max(n, nbytes // 4) // n * n
    buf = torch.ones(numel, dtype=torch.float32, device=device)
    shard = torch.empty(numel // n, dtype=torch.float32, device=device)
    out = torch.empty_like(buf)
    if mesh is not None and kind in ("all_gather", "reduce_scatter", "all_reduce"):
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        src, dst, local = {"all_gather": (Shard(0), Replicate(), shard), "reduce_scatter": (Partial(), Shard(0), buf),
                           "all_reduce": (Partial(), Replicate(), buf)}[kind]
        dt = DTensor.from_local(local, mesh, [src], run_check=False)
        return lambda: dt.redistribute(mesh, [dst]).to_local().add_(0)   # add_ waits for the result
    if kind == "all_reduce":
        return lambda: dist.all_reduce(buf, group=group)
    if kind == "all_gather":
        return lambda: dist.all_gather_into_tensor(out, shard, group=group)
    if kind == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(shard, buf, group=group)
    if kind == "all_to_all":
        return lambda: dist.all_to_all_single(out, buf, group=group)
    nxt, prv = dist.get_global_rank(group, (me + 1) % n), dist.get_global_rank(group, (me - 1) % n)

    def shift():   # every rank sends to the next and receives from the previous, at once
        ops = [dist.P2POp(dist.isend, buf, nxt, group), dist.P2POp(dist.irecv, out, prv, group)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return shift


def _timed(fn, iters: int, group, device) -> float:
    import torch
    import torch.distributed as dist

    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type != "cpu":
        torch.accelerator.synchronize()
    return _agreed_max((time.perf_counter() - start) / iters, group)


def _compute_slice(device, size: int = 192, reps: int = 2):
    import torch

    a = torch.randn(size, size, device=device)

    def work():
        x = a
        for _ in range(reps):
            x = x @ a
        return x
    return work


def time_in_step(kind: str, group, nbytes: int, iters: int, device, repeats: int = 3,
                 slice_s: float | None = None, mesh=None) -> float:
    """Seconds one `kind` collective adds to a step: each call follows a slice of computation
    (about `slice_s` seconds where given: the compute a step does between two collectives),
    minus the same computation alone; the median of `repeats` paired runs."""
    coll, one = _call(kind, group, nbytes, device, mesh), _compute_slice(device)
    reps = 1
    if slice_s:
        reps = max(1, round(slice_s / max(_timed(one, 3, group, device), 1e-7)))

    def work():
        for _ in range(reps):
            one()
    both = lambda: (work(), coll())  # noqa: E731
    _timed(both, 2, group, device)
    diffs = [_timed(both, iters, group, device) - _timed(work, iters, group, device) for _ in range(repeats)]
    return max(statistics.median(diffs), 1e-7)


def probe_in_step(group, device, kinds=KINDS, sizes: tuple[int, ...] = (1 << 10, 1 << 20), iters: int = 10,
                  slice_s: float | None = None, scale: float = 1.0, mesh=None) -> tuple[dict, dict]:
    """Per-kind links ({kind: Link}, alpha per ring step, bus bandwidth × `scale`) fitted to
    in-step timings over `group` (through DTensor where `mesh` is given), and the raw
    samples. Collective over `group`."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    links, samples = {}, {}
    for kind in kinds:
        ks = [(s, time_in_step(kind, group, s, iters, device, slice_s=slice_s, mesh=mesh)) for s in sizes]
        f = fit_alpha_beta(ks, n, kind)
        links[kind] = Link(f.alpha_s, f.bandwidth_gbps * scale)
        samples[kind] = [{"bytes": s, "seconds": t} for s, t in ks]
    return links, samples


def measure_overlap(group, device, nbytes: int = 1 << 22, repeats: int = 3) -> float:
    """Share of a collective hidden behind computation that runs while it is in flight:
    (t_compute + t_comm - t_together) / min(t_compute, t_comm), clamped to [0, 1]."""
    import torch.distributed as dist

    coll, work = _call("all_reduce", group, nbytes, device), _compute_slice(device, reps=8)
    t_comm = _timed(coll, 5, group, device)
    reps = max(1, round(t_comm / max(_timed(work, 5, group, device), 1e-7)))

    def compute():
        for _ in range(reps):
            work()

    import torch
    buf = torch.ones(max(1, nbytes // 4), device=device)

    def together():
        w = dist.all_reduce(buf, group=group, async_op=True)
        compute()
        w.wait()
    effs = []
    for _ in range(repeats):
        tc, tm, tb = (_timed(compute, 3, group, device), _timed(coll, 3, group, device),
                      _timed(together, 3, group, device))
        effs.append((tc + tm - tb) / max(min(tc, tm), 1e-9))
    return min(1.0, max(0.0, statistics.median(effs)))


def probe_topology(ctx, sizes: tuple[int, ...] = (1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22), iters: int = 5,
                   path: str | Path | None = None, node_size: int = 0,
                   kind_sizes: tuple[int, ...] = (1 << 10, 1 << 16, 1 << 20), kind_iters: int = 20) -> dict:
    """Measure each link class on the running job and return (rank 0 also writes to `path`) a
    topology dict. Collective: every rank of the world must call it.

    Nodes come from hostnames (or `node_size` consecutive ranks). Intra-node: collectives
    inside each node. Inter-node: among the ranks at the same position of every node, all
    positions at once, as in training, so the fitted ring bandwidth is multiplied by the ranks
    per node to give the node's aggregate. Per link class: a back-to-back all-reduce fit
    (`links`), then every collective kind timed in step (`collectives`, `kind_iters` calls
    per size; `kind_sizes=()` skips it), then the overlap efficiency."""
    import torch.distributed as dist

    from suanli.infra.lowbw.allreduce import build_hierarchy, node_ids

    world = dist.get_world_size()
    if world < 2:
        raise ValueError("probe_topology: needs at least 2 processes (start with --nproc 2 or more)")
    h = build_hierarchy([list(range(world))], node_ids(world, node_size), dist.get_rank())
    measured: dict = {}
    links: dict[str, Link] = {}
    kinds: dict[str, dict[str, Link]] = {}
    overlap = None
    for name, group, n in (("intra_node", h.intra, h.ranks_per_node), ("inter_node", h.inter, h.n_nodes)):
        if n < 2:
            continue
        scale = h.ranks_per_node if name == "inter_node" else 1
        samples = [(s, _timed(_call("all_reduce", group, s, ctx.device), iters, group, ctx.device)) for s in sizes]
        fit = fit_alpha_beta(samples, n)
        links[name] = Link(fit.alpha_s, fit.bandwidth_gbps * scale)
        measured[name] = {"ranks": n, "concurrent_rings": h.ranks_per_node if name == "inter_node" else h.n_nodes,
                          "samples": [{"bytes": s, "seconds": t} for s, t in samples]}
        if kind_sizes:
            kinds[name], measured[name]["in_step"] = probe_in_step(group, ctx.device, KINDS, kind_sizes, kind_iters,
                                                                   scale=scale)
            eff = measure_overlap(group, ctx.device)
            overlap = eff if overlap is None else min(overlap, eff)
    if "intra_node" not in links:
        # One rank per node: there is no intra-node link to measure; the planner then needs
        # --intra-gbps, so record the inter-node fit and say so.
        measured["note"] = "one rank per node: intra_node copied from inter_node"
        links["intra_node"] = links["inter_node"]
    topo = Topology(links["intra_node"], links.get("inter_node"), h.ranks_per_node, "probe",
                    {"backend": dist.get_backend(), "world_size": world, **measured}, kinds, overlap)
    if path is not None and dist.get_rank() == 0:
        write_topology(topo, path)
    return topo.to_dict()


__all__ = ["Link", "Topology", "KINDS", "ring_steps", "bus_factor", "topology_from_dict", "read_topology",
           "write_topology", "fit_alpha_beta", "probe_topology", "probe_in_step", "time_in_step", "measure_overlap"]
