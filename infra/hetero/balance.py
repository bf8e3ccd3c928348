"""Load balancing across device types: layers per stage, rows per replica, and the step
time and bubble they predict.

Speeds come from the groups' `speed` in the config (relative per-device throughput) when
every group gives one, otherwise all from the HAL's peak-FLOPS table (`balance =
"table"`) or all measured (`balance = "measure"`: one transformer block's forward +
backward on each rank, group by group; an emulated slow device is measured slow because
the measurement runs inside its compute span). Speeds from different sources are never mixed.

Everything is counted per *replica* (the tp ranks that run one copy of a stage together):
a replica's speed is rows of the batch per unit time. Measured, it is timed with the
group's real tensor parallel, so what tp costs on that vendor's links is in it; from the
config or the table it is tp x the per-device speed (tp taken as perfectly efficient). A
stage's capacity is the sum of its replicas' speeds; layers are split so the slowest
stage's work / capacity is minimal (exact dynamic programme), and within a stage held by
several groups rows go to each replica in proportion to its speed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from suanli.infra.hetero.layout import DeviceGroup, HeteroPlan, LayoutError
from suanli.infra.pipeline import balanced_layers, stage_work  # noqa: F401  (re-exported for the planner)

BALANCE_MODES = ("none", "table", "measure")


def compute_span(acc):
    """The accelerator's compute-span context (the emulated device's slowdown), or nothing."""
    span = getattr(acc, "compute_span", None)
    return span() if span is not None else contextlib.nullcontext()


def stage_capacity(groups: list[DeviceGroup], stage: int, replica_speed: dict[int, float]) -> float:
    return sum(g.dp * replica_speed[g.index] for g in groups if stage in g.stages)


def replica_speeds(groups: list[DeviceGroup], device_speed: dict[int, float]) -> dict[int, float]:
    """From per-device speeds (config or table): tp devices per replica, perfectly efficient."""
    return {g.index: g.tp * device_speed[g.index] for g in groups}


# ---------------------------------------------------------------- where speeds come from


class _OneBlock(nn.Module):
    """A container apply_tp accepts: one block under `layers`, nothing else."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({"0": block})


def measure_block_seconds(acc, device, model_cfg, seq_len: int, micro_batch: int, tp_mesh=None,
                          reps: int = 7) -> float:
    """Seconds for one transformer block's forward + backward on `micro_batch` rows, run by
    one replica: with `tp_mesh` (tp > 1) every tp rank calls this together and the block is
    sharded exactly as in training, collectives included. Timed inside the accelerator's
    compute span; the fastest of `reps` runs (the least disturbed one)."""
    from suanli.infra.model import TransformerBlock, rope_tables

    torch.manual_seed(0)
    block = TransformerBlock(model_cfg).to(device)
    tp = tp_mesh.size() if tp_mesh is not None else 1
    if tp > 1:
        from suanli.infra.tensor_parallel import apply_tp

        apply_tp(_OneBlock(block), tp_mesh)
    cos, sin = rope_tables(model_cfg.head_dim, seq_len, model_cfg.rope_theta)
    cos, sin = cos.to(device), sin.to(device)
    # Between blocks the residual stream is sequence-sharded: each tp rank holds S / tp.
    x = torch.randn(micro_batch, seq_len // tp, model_cfg.dim, device=device, requires_grad=True)
    clock = busy_clock(acc)
    times = []
    for i in range(reps + 2):   # two warm-up runs (allocator, kernel selection)
        acc.synchronize()
        start = clock()
        with compute_span(acc):
            block(x, cos, sin).float().pow(2).mean().backward()
            acc.synchronize()
        if i >= 2:
            times.append(clock() - start)
    return min(times)


def busy_clock(acc):
    """How long the device was busy. An accelerator: wall time around synchronised work. A
    CPU "device": the process's CPU time (its wall time swings with whatever else the host
    runs) plus what an emulated slow device adds to it."""
    if acc.device_type != "cpu":
        return time.perf_counter
    return lambda: time.process_time() + getattr(acc, "busy_extra_s", 0.0)


# ---------------------------------------------------------------- the predicted schedule


@dataclass
class Prediction:
    step_s: float                    # makespan of forward + backward (grad sync not modelled)
    bubble: float                    # mean over ranks of idle / makespan
    stage_bubble: dict[int, float]   # per stage, mean over its replicas
    unit: str                        # "s" when from measured seconds, "relative" otherwise

    def as_dict(self) -> dict:
        return {"step": self.step_s, "unit": self.unit, "bubble": self.bubble,
                "stage_bubble": {str(k): v for k, v in self.stage_bubble.items()}}


def simulate(plan: HeteroPlan, row_fwd_s: dict[int, float], costs: tuple[float, float, float],
             bwd_ratio: float = 2.0, unit: str = "s") -> Prediction:
    """Run the engine's schedule on paper: every rank does its forwards in micro-batch order,
    then its backwards in the same order, each waiting for the pieces it receives.

    row_fwd_s: per group, seconds (or relative time) of one layer's forward on one row by
    one of its replicas. Transfer time is not modelled (it is measured instead)."""
    n = plan.n_stages
    dur: dict[tuple[int, int, int, int], float] = {}   # (stage, group, dp, micro) -> forward time
    for s, reps in plan.replicas.items():
        for r in reps:
            per_row = stage_work(s, n, plan.layers[s], costs) * row_fwd_s[r.group]
            for k, (lo, hi) in enumerate(r.micro):
                dur[(s, r.group, r.dp, k)] = per_row * (hi - lo)

    def key_of(rank: int, stage: int, micro: int):
        g = plan.group_of(rank)
        return (stage, g.index, g.coords(rank)[1], micro)

    deps_f: dict[tuple, list[tuple]] = {}
    deps_b: dict[tuple, list[tuple]] = {}
    for b in range(n - 1):
        for m in plan.boundary(b):
            src, dst = key_of(m.src, b, m.src_micro), key_of(m.dst, b + 1, m.dst_micro)
            deps_f.setdefault(dst, []).append(src)
            deps_b.setdefault(src, []).append(dst)

    end_f: dict[tuple, float] = {}
    for s in range(n):
        for r in plan.replicas[s]:
            t = 0.0
            for k in range(len(r.micro)):
                key = (s, r.group, r.dp, k)
                t = max([t] + [end_f[d] for d in deps_f.get(key, [])]) + dur[key]
                end_f[key] = t
    end_b: dict[tuple, float] = {}
    for s in range(n - 1, -1, -1):
        for r in plan.replicas[s]:
            t = end_f[(s, r.group, r.dp, len(r.micro) - 1)]
            for k in range(len(r.micro)):
                key = (s, r.group, r.dp, k)
                t = max([t] + [end_b[d] for d in deps_b.get(key, [])]) + bwd_ratio * dur[key]
                end_b[key] = t
    makespan = max(end_b.values())
    idle_by_stage: dict[int, list[float]] = {}
    idle_by_rank = []
    for s, reps in plan.replicas.items():
        for r in reps:
            busy = (1 + bwd_ratio) * sum(dur[(s, r.group, r.dp, k)] for k in range(len(r.micro)))
            idle = 1 - busy / makespan
            idle_by_stage.setdefault(s, []).append(idle)
            idle_by_rank += [idle] * plan.groups[r.group].tp
    return Prediction(makespan, sum(idle_by_rank) / len(idle_by_rank),
                      {s: sum(v) / len(v) for s, v in idle_by_stage.items()}, unit)


def check_speeds(groups: list[DeviceGroup], speeds: dict[int, float | None], mode: str) -> dict[int, float]:
    bad = [g for g in groups if not speeds.get(g.index)]
    if bad:
        g = bad[0]
        why = ("its device is not in the peak-FLOPS table" if mode == "table"
               else "no speed was measured or given")
        raise LayoutError(f"{g.where}.speed: hetero.balance = \"{mode}\" needs every group's speed, but for "
                          f"device '{g.device}' {why}; give every group a speed (relative device throughput) or use "
                          f"hetero.balance = \"measure\"")
    return {k: float(v) for k, v in speeds.items()}  # type: ignore[arg-type]


__all__ = ["BALANCE_MODES", "Prediction", "balanced_layers", "busy_clock", "check_speeds", "compute_span",
           "measure_block_seconds", "replica_speeds", "simulate", "stage_capacity", "stage_work"]
