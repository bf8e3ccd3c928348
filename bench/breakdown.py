"""Where a training step's time went, from a torch.profiler trace of that step.

Method (the numbers say nothing the trace does not):

- The step window is a `bench::step` record_function the benchmark opens when the trainer
  starts fetching data and closes when the step's metrics are written.
- *compute*: the union of intervals in which this rank computes. On CPU that is every
  `aten::` op on the thread that ran the step (the autograd engine runs CPU backward on
  the calling thread); on an accelerator it is every device-side event (kernel) that is
  not a collective.
- *collective*: the union of intervals of events named like a collective (all_reduce,
  reduce_scatter, all_gather, broadcast, all_to_all, barrier, functional-collective waits),
  on any thread (gloo runs them on worker threads) or on the device.
- *p2p*: the union of send/recv events (pipeline activations and gradients).
- exposed communication = |collective − compute|: collective time nothing overlaps.
- pipeline wait = |p2p − compute − collective|: a stage neither computes nor reduces while
  it waits for a neighbour — the measured pipeline bubble (plus p2p transfer time).
- other = the rest of the window: host overhead (Python, the optimizer's bookkeeping,
  data loading, metrics), allocator and idle time.
All are fractions of the step window, averaged over profiled steps and then over ranks.
Profiling slows small ops, so the benchmark times its steps unprofiled and profiles extra
steps only for these fractions.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

Interval = tuple[float, float]

COLLECTIVE = re.compile(r"all_?reduce|reduce_?scatter|all_?gather|broadcast|all_?to_?all|barrier|wait_tensor",
                        re.IGNORECASE)
P2P = re.compile(r"send|recv", re.IGNORECASE)
STEP_MARK = "bench::step"

# Bubble fraction of an ideal pipeline with p stages, m micro-batches and v stages per rank
# (Narayanan et al. 2021): idle (p-1) slots out of m·v + p-1. Zero-bubble schedules have none
# in theory, so they get no formula rather than a wrong one.
BUBBLE_FORMULA = {
    "gpipe": lambda p, m, v: (p - 1) / (m + p - 1),
    "1f1b": lambda p, m, v: (p - 1) / (m + p - 1),
    "interleaved-1f1b": lambda p, m, v: (p - 1) / (v * m + p - 1),
}


def bubble_formula(schedule: str, pp: int, microbatches: int, stages_per_rank: int = 1) -> float | None:
    if pp <= 1:
        return 0.0
    f = BUBBLE_FORMULA.get(schedule)
    return None if f is None else f(pp, microbatches, stages_per_rank)


def merge(intervals: list[Interval]) -> list[Interval]:
    out: list[list[float]] = []
    for s, e in sorted(i for i in intervals if i[1] > i[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def clip(intervals: list[Interval], window: Interval) -> list[Interval]:
    return merge([(max(s, window[0]), min(e, window[1])) for s, e in intervals])


def subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Parts of merged `a` not covered by merged `b`."""
    out, j = [], 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def length(intervals: list[Interval]) -> float:
    return sum(e - s for s, e in intervals)


@dataclass
class Breakdown:
    compute: float          # fractions of the step window
    exposed_comm: float
    pipeline_wait: float
    other: float
    steps: int              # profiled step windows averaged

    def as_dict(self) -> dict:
        return asdict(self)


def classify(events, on_device: bool) -> tuple[list[Interval], list[Interval], list[Interval], list[Interval], int]:
    """(step windows, compute, collective, p2p) intervals in µs from profiler events."""
    from torch.autograd import DeviceType

    steps = [e for e in events if e.name == STEP_MARK]
    threads = {e.thread for e in steps}
    compute, coll, p2p = [], [], []
    for e in events:
        iv = (e.time_range.start, e.time_range.end)
        device_side = e.device_type != DeviceType.CPU
        if COLLECTIVE.search(e.name):
            coll.append(iv)
        elif P2P.search(e.name):
            p2p.append(iv)
        elif on_device and device_side:
            compute.append(iv)
        elif not on_device and e.thread in threads and e.name.startswith("aten::"):
            compute.append(iv)
    windows = [(e.time_range.start, e.time_range.end) for e in steps]
    return windows, merge(compute), merge(coll), merge(p2p), len(steps)


def breakdown_from_events(events, on_device: bool) -> Breakdown | None:
    windows, compute, coll, p2p, n = classify(events, on_device)
    if not windows:
        return None
    fr = {"compute": 0.0, "exposed_comm": 0.0, "pipeline_wait": 0.0}
    for w in windows:
        span = w[1] - w[0]
        c, k, p = clip(compute, w), clip(coll, w), clip(p2p, w)
        fr["compute"] += length(c) / span
        fr["exposed_comm"] += length(subtract(k, c)) / span
        fr["pipeline_wait"] += length(subtract(subtract(p, c), k)) / span
    fr = {k: v / len(windows) for k, v in fr.items()}
    return Breakdown(fr["compute"], fr["exposed_comm"], fr["pipeline_wait"],
                     max(0.0, 1.0 - sum(fr.values())), n)


def mean_breakdown(per_rank: list[dict | None]) -> dict | None:
    rows = [r for r in per_rank if r]
    if not rows:
        return None
    keys = ("compute", "exposed_comm", "pipeline_wait", "other")
    out = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    out["max_exposed_comm"] = max(r["exposed_comm"] for r in rows)
    out["max_pipeline_wait"] = max(r["pipeline_wait"] for r in rows)
    out["ranks"] = len(rows)
    out["steps"] = rows[0]["steps"]
    return out


METHOD = ("torch.profiler over extra steps after the timed ones; compute = union of aten ops on the training "
          "thread (CPU) or non-collective device events; exposed comm = collective time not overlapped by compute; "
          "pipeline wait = send/recv time not overlapped by compute or collectives; fractions of the step, "
          "mean over ranks")

__all__ = ["Breakdown", "breakdown_from_events", "mean_breakdown", "bubble_formula", "merge", "subtract", "clip",
           "length", "STEP_MARK", "METHOD"]
