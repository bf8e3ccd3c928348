"""`suanli bench mfu --sweep`: the MFU benchmark over a grid of layouts and micro-batches.

A grid is "key=v1,v2 key=v1,..." over MfuSpec fields (tp, pp, dp, micro_batch, dp_mode,
schedule, ...); what the grid leaves out comes from the command's own flags. Points that
need more processes than `max_procs` or that the model cannot be split into are skipped
before anything starts; a point that fails while running is kept as a failed row.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import fields, replace
from pathlib import Path

from suanli.bench.mfu_run import MfuSpec, run_mfu

DEFAULT_GRID = "tp=1,2 pp=1,2 dp=1,2"


def parse_grid(text: str | None) -> dict[str, list]:
    types = {f.name: f.type for f in fields(MfuSpec)}
    grid: dict[str, list] = {}
    for part in (text or DEFAULT_GRID).split():
        if "=" not in part:
            raise ValueError(f"--grid: {part!r} is not key=v1,v2 (keys: {', '.join(types)})")
        key, values = part.split("=", 1)
        key = key.replace("-", "_")
        if key not in types:
            raise ValueError(f"--grid: unknown key {key!r}; keys: {', '.join(types)}")
        cast = {"int": int, "float": float}.get(str(types[key]), str)
        try:
            grid[key] = [cast(v) for v in values.split(",") if v]
        except ValueError:
            raise ValueError(f"--grid: {key} takes {types[key]} values, got {values!r}") from None
    return grid


def fits(spec: MfuSpec, max_procs: int) -> bool:
    from suanli.infra.model import preset
    from suanli.infra.pipeline import stages_per_rank

    cfg = preset(spec.model)
    per_rank = stages_per_rank(spec.schedule, spec.stages_per_rank) if spec.pp > 1 else 1
    return (spec.nproc <= max_procs and cfg.n_heads % spec.tp == 0 and cfg.n_kv_heads % spec.tp == 0
            and spec.pp * per_rank <= cfg.n_layers)


def expand(base: MfuSpec, grid: dict[str, list], max_procs: int) -> list[MfuSpec]:
    specs, seen = [], set()
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        s = replace(base, **dict(zip(keys, values)))
        # dp_mode means nothing without dp, nor the schedule without pp: one point each.
        if s.dp == 1:
            s = replace(s, dp_mode=base.dp_mode)
        if s.pp == 1:
            s = replace(s, schedule=base.schedule)
        if s.label() in seen or not fits(s, max_procs):
            continue
        seen.add(s.label())
        specs.append(s)
    return sorted(specs, key=lambda s: (s.nproc, s.tp, s.pp, s.dp, s.micro_batch))


def default_max_procs() -> int:
    import os

    from suanli.backends import get_accelerator

    acc = get_accelerator()
    # One process per device; a CPU is one "device" per core, and more than 4 processes on a
    # small machine measures the scheduler, not suanli.
    return min(4, os.cpu_count() or 1) if acc.device_type == "cpu" else acc.device_count()


def run_sweep(specs: list[MfuSpec], quiet: bool = False) -> list[dict]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from suanli.bench.ranks import BenchRunError

    results = []
    # Progress on stderr: stdout stays clean for --json.
    console = Console(stderr=True, quiet=quiet)
    with Progress(TextColumn("mfu sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=len(specs))
        for s in specs:
            bar.update(task, description=s.label())
            try:
                results.append(run_mfu(s))
            except BenchRunError as e:
                last = [ln for ln in str(e).splitlines() if ln.strip()][-1]
                results.append({"layout": s.label(), "world_size": s.nproc, "error": last[:200]})
            bar.advance(task)
    return results


def run_sweep_to(base: MfuSpec, grid_text: str | None, max_procs: int | None, out: str | None,
                 quiet: bool = False) -> dict:
    from suanli.backends import get_accelerator
    from suanli.bench.report import results_dir, sweep_markdown, write_sweep

    base.validate()
    specs = expand(base, parse_grid(grid_text), max_procs or default_max_procs())
    if not specs:
        raise ValueError("--grid: no layout fits (check --max-procs and the model's heads and layers)")
    results = run_sweep(specs, quiet)
    out_dir = Path(out) if out else results_dir(Path("bench/results"), get_accelerator().device_name())
    files = write_sweep(results, out_dir, " ".join(["suanli"] + sys.argv[1:]))
    return {"out_dir": str(out_dir), "files": {k: str(v) for k, v in files.items()}, "results": results,
            "text": sweep_markdown(results) + f"\n\nwritten to {out_dir}"}


__all__ = ["parse_grid", "expand", "run_sweep", "run_sweep_to", "DEFAULT_GRID"]
