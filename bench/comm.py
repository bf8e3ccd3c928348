"""`suanli bench comm`: collective bandwidth on the current backend, as nccl-tests define it.

For a message of S bytes taking t seconds (mean over the timed iterations, then the
slowest rank — a collective is done when its last rank is):
    algbw = S / t
    busbw = algbw · factor(n), the rate each link must carry, comparable across n:
        all_reduce       2(n-1)/n     (reduce-scatter then all-gather)
        all_gather       (n-1)/n      S = the gathered (output) size
        reduce_scatter   (n-1)/n      S = the input size
        all_to_all       (n-1)/n      S = the input size
        broadcast        1
        p2p              1            each rank sends S to the next and receives S from the
                                      previous at once (nccl-tests sendrecv)
One process per device, on whatever collective backend the HAL picks (gloo on CPU). With
--group-size G the world is cut into blocks of G consecutive ranks and every block runs the
collective at once on its own sub-group (e.g. G = ranks per node measures the intra-node
links under full load); n above is then G. --topology-out also runs the planner's topology
probe (infra/plan_comm.py) and writes the file `suanli plan --topology` reads.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "p2p": lambda n: 1.0,
}

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--sizes: cannot read {text!r} as a byte count (e.g. 4096, 64K, 16M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


@dataclass
class CommSpec:
    op: str = "all_reduce"
    sizes: list[int] = field(default_factory=lambda: [1 << 10, 1 << 16, 1 << 20, 1 << 24])
    min_time_s: float = 0.2
    warmup: int = 5
    group_size: int = 0          # 0: the whole world; else blocks of this many consecutive ranks
    topology_out: str = ""       # also probe link classes for the planner and write this file


def bandwidth(op: str, size_bytes: int, time_s: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s."""
    algbw = size_bytes / time_s
    return algbw, algbw * BUS_FACTOR[op](n)


def _op_call(op: str, buf, n: int, group=None, members: list[int] | None = None):
    """A zero-argument callable running one collective on `buf` (S bytes as nccl-tests count
    them) over `group` (None: the world), whose global ranks are `members`."""
    import torch
    import torch.distributed as dist

    members = members or list(range(n))
    if op == "all_reduce":
        return lambda: dist.all_reduce(buf, group=group)
    if op == "broadcast":
        return lambda: dist.broadcast(buf, src=members[0], group=group)
    if op == "p2p":
        me = members.index(dist.get_rank())
        nxt, prev = members[(me + 1) % n], members[(me - 1) % n]
        recv = torch.empty_like(buf)

        def sendrecv() -> None:
            for req in (dist.isend(buf, nxt, group=group), dist.irecv(recv, prev, group=group)):
                req.wait()
        return sendrecv
    shard = buf.numel() // n
    if op == "all_gather":
        part = torch.empty(shard, dtype=buf.dtype, device=buf.device)
        return lambda: dist.all_gather_into_tensor(buf[: shard * n], part, group=group)
    if op == "reduce_scatter":
        out = torch.empty(shard, dtype=buf.dtype, device=buf.device)
        return lambda: dist.reduce_scatter_tensor(out, buf[: shard * n], group=group)
    if op == "all_to_all":
        out = torch.empty(shard * n, dtype=buf.dtype, device=buf.device)
        return lambda: dist.all_to_all_single(out, buf[: shard * n], group=group)
    raise ValueError(f"--ops: '{op}' is not one of {sorted(BUS_FACTOR)}")


def _blocks(world: int, group_size: int):
    """This rank's sub-group and its members (every rank creates every group, in order)."""
    import torch.distributed as dist

    if group_size in (0, world):
        return None, list(range(world))
    if group_size < 1 or world % group_size:
        raise ValueError(f"--group-size: {group_size} does not divide the {world} processes")
    mine = None
    for start in range(0, world, group_size):
        members = list(range(start, start + group_size))
        g = dist.new_group(members)
        if dist.get_rank() in members:
            mine = (g, members)
    return mine


def _agreed_max(x: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def rank_main(d: dict) -> dict | None:
    import torch
    import torch.distributed as dist

    from suanli.infra.distributed import init, shutdown

    spec = CommSpec(**d)
    if spec.op not in BUS_FACTOR:
        raise ValueError(f"--op: '{spec.op}' is not one of {sorted(BUS_FACTOR)}")
    ctx = init()
    acc = ctx.accelerator
    rows, topology = [], None
    try:
        group, members = _blocks(ctx.world_size, spec.group_size)
        n = len(members)
        if spec.op == "p2p" and n < 2:
            raise ValueError("--ops p2p: needs at least 2 processes per group")
        for size in spec.sizes:
            buf = torch.ones(max(n, size // 4), dtype=torch.float32, device=ctx.device)
            nbytes = buf.numel() * 4
            run = _op_call(spec.op, buf, n, group, members)

            def timed(iters: int) -> float:
                dist.barrier()
                acc.synchronize()
                start = time.perf_counter()
                for _ in range(iters):
                    run()
                acc.synchronize()
                return _agreed_max(time.perf_counter() - start)

            timed(spec.warmup)
            probe = timed(3) / 3
            # Every rank must run the same count: calibrate from the slowest rank's probe.
            iters = max(3, min(10_000, int(spec.min_time_s / max(probe, 1e-7))))
            t = timed(iters) / iters
            algbw, busbw = bandwidth(spec.op, nbytes, t, n)
            rows.append({"size_bytes": nbytes, "count": buf.numel(), "dtype": "float32", "iters": iters,
                         "time_us": t * 1e6, "algbw_GBps": algbw / 1e9, "busbw_GBps": busbw / 1e9})
        if spec.topology_out:
            from suanli.infra.plan_comm import probe_topology

            topology = probe_topology(ctx, path=spec.topology_out)
    finally:
        backend = dist.get_backend()
        shutdown()
    if ctx.rank != 0:
        return None
    return {"op": spec.op, "world_size": n, "groups": ctx.world_size // n, "backend": backend,
            "device": acc.device_name(), "accelerator": acc.name, "rows": rows,
            "topology_file": spec.topology_out or None, "topology": topology,
            "method": "nccl-tests definitions: time = mean per iteration, max over ranks; algbw = S/t; "
                      f"busbw = algbw * {'2(n-1)/n' if spec.op == 'all_reduce' else 'bus factor'}"}


def run_comm(spec: CommSpec, nproc: int, timeout_s: float = 900) -> dict:
    from suanli.bench.ranks import run_ranks

    if nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {nproc}")
    return run_ranks("comm", asdict(spec), nproc, timeout_s=timeout_s)


def _human(nbytes: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= div and nbytes % div == 0:
            return f"{nbytes // div}{unit}"
    return str(nbytes)


def format_comm(r: dict) -> str:
    groups = f", {r['groups']} groups at once" if r.get("groups", 1) > 1 else ""
    lines = [f"{r['op']} on {r['world_size']} x {r['device']} ({r['backend']}){groups}",
             f"{'size':>8} {'count':>10} {'time (us)':>11} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}"]
    for row in r["rows"]:
        lines.append(f"{_human(row['size_bytes']):>8} {row['count']:>10} {row['time_us']:>11.1f} "
                     f"{row['algbw_GBps']:>13.3f} {row['busbw_GBps']:>13.3f}")
    if r["world_size"] == 1:
        lines.append("one process: nothing crosses a link, busbw is 0 by definition")
    lines.append(f"method: {r['method']}")
    if r.get("topology_file"):
        lines.append(f"topology for `suanli plan --topology`: {r['topology_file']}")
    return "\n".join(lines)


__all__ = ["CommSpec", "run_comm", "bandwidth", "parse_size", "format_comm", "BUS_FACTOR"]
