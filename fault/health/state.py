"""What the daemon knows about one reporting member (a training rank or a node agent), and
the tables that turn protocol enums into the words people read.

`Member.apply` is the daemon's hot path: it runs once per heartbeat (10,000 a second at
scale), so it only records; the detectors run later, on a timer, over these records.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from suanli.fault.proto import health_pb2 as pb

PHASES: dict[str, int] = {
    "unspecified": pb.PHASE_UNSPECIFIED, "data": pb.PHASE_DATA, "forward": pb.PHASE_FORWARD,
    "backward": pb.PHASE_BACKWARD, "optimizer": pb.PHASE_OPTIMIZER, "checkpoint": pb.PHASE_CHECKPOINT,
    "idle": pb.PHASE_IDLE, "done": pb.PHASE_DONE,
}
PHASE_NAMES: dict[int, str] = {v: k for k, v in PHASES.items()}

EVENT_KINDS: dict[str, int] = {
    "dead": pb.EVENT_DEAD, "hung": pb.EVENT_HUNG, "straggler": pb.EVENT_STRAGGLER,
    "diverging": pb.EVENT_DIVERGING, "unhealthy": pb.EVENT_UNHEALTHY, "recovered": pb.EVENT_RECOVERED,
}
EVENT_NAMES: dict[int, str] = {v: k for k, v in EVENT_KINDS.items()}

# Conditions a member can be in, most severe first: the first active one is its state.
# "stalled" is a rank waiting on a hung peer: shown in status, never an event of its own
# (the hung suspect's event lists it).
CONDITIONS: tuple[str, ...] = ("dead", "hung", "stalled", "diverging", "unhealthy", "straggler")
SILENT_CONDITIONS = frozenset({"stalled"})

STEP_WINDOW = 64     # step times kept per rank for the rolling p99
EWMA_ALPHA = 0.3     # weight of the newest step time in the straggler average


def member_id(job: str, rank: int, node: str) -> str:
    return f"{job}/{rank}" if rank >= 0 else f"node:{node}"


@dataclass(eq=False, slots=True)
class Member:
    id: str
    job: str
    rank: int                 # -1 for a node agent
    node: str
    pid: int = 0
    hb: Any = None            # last Heartbeat (rank) or NodeHeartbeat (node)
    last_seen: float = 0.0    # monotonic seconds
    last_progress: float = 0.0
    step: int = -1
    collectives: int = -1
    phase: int = pb.PHASE_UNSPECIFIED
    step_times: deque = field(default_factory=lambda: deque(maxlen=STEP_WINDOW))
    step_ewma: float = 0.0
    n_steps: int = 0
    devices: Any = ()         # last device readings (sent every few heartbeats)
    host: Any = None          # last HostMetrics
    health_dirty: bool = False
    health_blob: bytes | None = None   # devices + host serialized for the journal, until they change
    health_problems: str = ""
    nan_count: int = 0
    spike_count: int = 0
    diverged_until: float = 0.0
    divergence: str = ""
    slow_since: float = 0.0
    transit_min: float = float("inf")   # least (arrival - sent_unix) seen: this sender's clock offset
    conds: dict = field(default_factory=dict)     # active condition -> message
    pending: list = field(default_factory=list)   # Commands for the next reply
    hang_seen_at: float = 0.0                     # hung, waiting for the stack dump
    dump_id: int = 0
    dump_path: str = ""
    dirty: bool = True

    @property
    def done(self) -> bool:
        return self.phase == pb.PHASE_DONE

    @property
    def state(self) -> str:
        if not self.conds:
            return "done" if self.phase == pb.PHASE_DONE else "ok"
        for c in CONDITIONS:
            if c in self.conds:
                return c
        return "done" if self.done else "ok"

    def apply(self, hb: pb.Heartbeat, now: float, diverging_hold_s: float) -> None:
        """Record one rank heartbeat."""
        if hb.pid != self.pid:
            self.restart(hb.pid, now)
        self.hb = hb
        self.last_seen = now
        self.phase = hb.phase
        self.dirty = True
        if hb.step != self.step or hb.collectives != self.collectives:
            if hb.step != self.step and hb.step_time_s > 0.0:
                self.step_times.append(hb.step_time_s)
                self.step_ewma = hb.step_time_s if self.n_steps == 0 else \
                    EWMA_ALPHA * hb.step_time_s + (1.0 - EWMA_ALPHA) * self.step_ewma
                self.n_steps += 1
            self.step, self.collectives = hb.step, hb.collectives
            self.last_progress = now
        if hb.devices or hb.HasField("host"):
            self.devices = list(hb.devices) or self.devices
            self.host = hb.host if hb.HasField("host") else self.host
            self.health_dirty, self.health_blob = True, None
        if hb.nan_count > self.nan_count or hb.spike_count > self.spike_count:
            new_nan, new_spike = hb.nan_count - self.nan_count, hb.spike_count - self.spike_count
            what = " and ".join(w for n, w in ((new_nan, f"{new_nan} NaN/Inf"), (new_spike, f"{new_spike} loss spike(s)")) if n > 0)
            self.divergence = f"{what} flagged by the guard by step {hb.step}"
            self.diverged_until = now + diverging_hold_s
        self.nan_count, self.spike_count = hb.nan_count, hb.spike_count
        if hb.HasField("loss") and not math.isfinite(hb.loss):
            self.divergence = f"loss is {hb.loss} at step {hb.step}"
            self.diverged_until = now + diverging_hold_s
        if hb.dumped_id and hb.dumped_id == self.dump_id:
            self.dump_path = hb.dump_path

    def apply_node(self, nhb: pb.NodeHeartbeat, now: float) -> None:
        if nhb.pid != self.pid:
            self.pid = nhb.pid
        self.hb = nhb
        self.last_seen = now
        self.last_progress = now
        self.phase = pb.PHASE_DONE if nhb.leaving else pb.PHASE_UNSPECIFIED
        self.devices = list(nhb.devices)
        self.host = nhb.host if nhb.HasField("host") else None
        self.health_dirty, self.health_blob = True, None
        self.dirty = True

    def restart(self, pid: int, now: float) -> None:
        """A new process took this rank: its history no longer describes it."""
        self.pid = pid
        self.step = self.collectives = -1
        self.step_times.clear()
        self.step_ewma, self.n_steps = 0.0, 0
        self.nan_count = self.spike_count = 0
        self.diverged_until, self.slow_since = 0.0, 0.0
        self.last_progress = now
        self.hang_seen_at, self.dump_id, self.dump_path = 0.0, 0, ""
        self.transit_min = float("inf")
