"""`suanli bench suite`: peak, collective bandwidth and an MFU sweep into one dated report
directory, `bench/results/<date>-<device>/`, with `report.md` tying them together."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SuitePlan:
    dtypes: tuple[str, ...]
    quick_peak: bool
    comm_sizes: tuple[int, ...]
    comm_min_time_s: float
    model: str
    seq_len: int
    micro_batch: int
    steps: int
    warmup: int
    grid: str


PLANS = {
    "quick": SuitePlan(("fp32", "bf16"), True, (1 << 10, 1 << 16, 1 << 20, 1 << 22), 0.05, "tiny", 128, 4, 3, 1,
                       "tp=1,2 pp=1,2 dp=1,2"),
    "full": SuitePlan(("fp32", "bf16", "fp16"), False, (1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24,
                                                        1 << 26), 0.2, "small", 256, 4, 10, 2,
                      "tp=1,2 pp=1,2 dp=1,2 micro_batch=2,4"),
}


def run_suite(quick: bool = False, model: str | None = None, max_procs: int | None = None,
              root: Path = Path("bench/results")) -> Path:
    from suanli.backends import get_accelerator
    from suanli.bench.comm import CommSpec, run_comm
    from suanli.bench.mfu_run import MfuSpec
    from suanli.bench.peak import peak_report
    from suanli.bench.report import (comm_markdown, machine_info, machine_markdown, peak_markdown, results_dir,
                                     write_sweep)
    from suanli.bench.sweep import default_max_procs, expand, parse_grid, run_sweep

    plan = PLANS["quick" if quick else "full"]
    acc = get_accelerator()
    machine = machine_info()
    out = results_dir(root, machine["device"])
    procs = max_procs or default_max_procs()
    command = " ".join(["suanli"] + sys.argv[1:])
    sections = [f"# suanli benchmark report: {machine['device']}", machine_markdown(machine), f"command: `{command}`"]

    peaks = peak_report(list(plan.dtypes), acc, quick=plan.quick_peak)
    (out / "peak.json").write_text(json.dumps(peaks, indent=2))
    sections += ["## Dense GEMM peak (`suanli bench peak`)", peak_markdown(peaks),
                 f"method: {peaks[0]['detail']['method']}"]

    if procs >= 2:
        comm = run_comm(CommSpec(sizes=list(plan.comm_sizes), min_time_s=plan.comm_min_time_s), 2)
        (out / "comm.json").write_text(json.dumps(comm, indent=2))
        sections += ["## Collective bandwidth (`suanli bench comm`)", comm_markdown(comm), f"method: {comm['method']}"]
    else:
        sections += ["## Collective bandwidth", "skipped: one device only"]

    # CPUs have no table figure: measure, and say so in every row.
    peak_mode = "table" if acc.peak_flops("fp32") is not None else "measured"
    base = MfuSpec(model=model or plan.model, seq_len=plan.seq_len, micro_batch=plan.micro_batch, steps=plan.steps,
                   warmup=plan.warmup, peak=peak_mode)
    specs = expand(base, parse_grid(plan.grid), procs)
    results = run_sweep(specs)
    write_sweep(results, out, command)
    from suanli.bench.breakdown import METHOD
    from suanli.bench.report import sweep_markdown

    sections += [f"## MFU sweep (`suanli bench mfu --sweep`): {base.model}, seq {base.seq_len}, "
                 f"{base.steps} timed steps after {base.warmup} warm-up, peak {peak_mode}",
                 sweep_markdown(results), "![MFU by layout](mfu_by_layout.png)", "![scaling](scaling.png)",
                 f"time breakdown method: {METHOD}",
                 "MFU = tokens/s per device x model FLOPs per token (6N + 12LHQT, bench/flops.py) / peak per device; "
                 "HFU adds activation recomputation."]
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    return out


__all__ = ["run_suite", "PLANS"]
