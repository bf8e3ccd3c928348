"""`suanli bench comm`: collective bandwidth on the current backend, as nccl-tests define it.

For a message of S bytes taking t seconds (mean over the timed iterations, then the
slowest rank — a collective is done when its last rank is):
    algbw = S / t
    busbw = algbw · factor(n), the rate each link must carry, comparable across n:
        all_reduce       2(n-1)/n     (reduce-scatter then all-gather)
        all_gather       (n-1)/n      S = the gathered (output) size
        reduce_scatter   (n-1)/n      S = the input size
        broadcast        1
One process per device, on whatever collective backend the HAL picks (gloo on CPU).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
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


def bandwidth(op: str, size_bytes: int, time_s: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s."""
    algbw = size_bytes / time_s
    return algbw, algbw * BUS_FACTOR[op](n)


def _op_call(op: str, buf, n: int):
    """A zero-argument callable running one collective on `buf` (S bytes as nccl-tests count them)."""
    import torch
    import torch.distributed as dist

    if op == "all_reduce":
        return lambda: dist.all_reduce(buf)
    if op == "broadcast":
        return lambda: dist.broadcast(buf, src=0)
    shard = buf.numel() // n
    if op == "all_gather":
        part = torch.empty(shard, dtype=buf.dtype, device=buf.device)
        return lambda: dist.all_gather_into_tensor(buf[: shard * n], part)
    if op == "reduce_scatter":
        out = torch.empty(shard, dtype=buf.dtype, device=buf.device)
        return lambda: dist.reduce_scatter_tensor(out, buf[: shard * n])
    raise ValueError(f"--op: '{op}' is not one of {sorted(BUS_FACTOR)}")


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
    acc, n = ctx.accelerator, ctx.world_size
    rows = []
    try:
        for size in spec.sizes:
            buf = torch.ones(max(n, size // 4), dtype=torch.float32, device=ctx.device)
            nbytes = buf.numel() * 4
            run = _op_call(spec.op, buf, n)

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
    finally:
        backend = dist.get_backend()
        shutdown()
    if ctx.rank != 0:
        return None
    return {"op": spec.op, "world_size": n, "backend": backend, "device": acc.device_name(),
            "accelerator": acc.name, "rows": rows,
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
    lines = [f"{r['op']} on {r['world_size']} x {r['device']} ({r['backend']})",
             f"{'size':>8} {'count':>10} {'time (us)':>11} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}"]
    for row in r["rows"]:
        lines.append(f"{_human(row['size_bytes']):>8} {row['count']:>10} {row['time_us']:>11.1f} "
                     f"{row['algbw_GBps']:>13.3f} {row['busbw_GBps']:>13.3f}")
    if r["world_size"] == 1:
        lines.append("one process: nothing crosses a link, busbw is 0 by definition")
    lines.append(f"method: {r['method']}")
    return "\n".join(lines)


__all__ = ["CommSpec", "run_comm", "bandwidth", "parse_size", "format_comm", "BUS_FACTOR"]
