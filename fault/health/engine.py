"""The daemon's state machine: members in memory, detector results turned into events,
commands queued for ranks, the event history, and the journal snapshot/restore.

Not thread-safe by design: everything here runs on the daemon's event loop (a 10,000-rank
sweep takes ~10 ms there), except `status`, which only reads and runs on a thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from array import array
from bisect import bisect_left
from collections import Counter, deque
from typing import Callable

from suanli.fault.health.detectors import DetectorConfig, evaluate, health_problems
from suanli.fault.health.state import EVENT_KINDS, PHASE_NAMES, SILENT_CONDITIONS, Member, member_id
from suanli.fault.health.store import MemberRow, Store
from suanli.fault.proto import health_pb2 as pb

NO_COMMANDS: tuple = ()
# Upper bounds (s) of the report-delay histogram: heartbeat sent (sender's clock) -> applied here.
DELAY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
JOURNAL_STEP_TIMES = 16   # recent step times kept across a restart (enough for the hang budget)
log = logging.getLogger("suanli.health")


class TooManyMembers(Exception):
    pass


class Engine:
    def __init__(self, cfg: DetectorConfig, store: Store | None = None, max_members: int = 200_000,
                 ring_size: int = 10_000, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg, self.store, self.max_members = cfg, store, max_members
        self.clock, self.wall = clock, wall
        self.members: dict[str, Member] = {}
        self.flagged: set[Member] = set()           # members with conditions or a pending hang
        self.ring: deque[pb.Event] = deque(maxlen=ring_size)
        self.listeners: list[Callable[[pb.Event], None]] = []
        self.event_counts: Counter = Counter()
        self.reports = 0
        self.delay_counts = [0] * (len(DELAY_BUCKETS) + 1)   # last: slower than every bucket
        self.delay_sum = 0.0
        self._lag_now = self._lag_before = 0.0   # worst lateness of heartbeats this sweep and the last
        self.next_event_id = 1
        self._command_ids = itertools.count(1)
        if store is not None:
            self._restore(store)

    # ---- hot path: one call per heartbeat ----
    def heartbeat(self, hb: pb.Heartbeat):
        m = self.members.get(f"{hb.job}/{hb.rank}")
        if m is None:
            m = self._join(hb.job, hb.rank, hb.node)
        elif m.node != hb.node:
            m.node = hb.node
        m.apply(hb, self.clock(), self.cfg.diverging_hold_s)
        self.reports += 1
        if hb.sent_unix:
            d = self.wall() - hb.sent_unix
            self.delay_counts[bisect_left(DELAY_BUCKETS, d)] += 1
            self.delay_sum += d
            # How far behind this heartbeat arrived, net of the sender's clock offset: when
            # the daemon itself falls behind, silence is not death (see lag_s).
            if d < m.transit_min:
                m.transit_min = d
            elif d - m.transit_min > self._lag_now:
                self._lag_now = d - m.transit_min
        if m.pending:
            cmds, m.pending = m.pending, []
            return cmds
        return NO_COMMANDS

    def node_heartbeat(self, nhb: pb.NodeHeartbeat) -> None:
        m = self.members.get(member_id("", -1, nhb.node)) or self._join("", -1, nhb.node)
        m.apply_node(nhb, self.clock())
        self.reports += 1

    def _join(self, job: str, rank: int, node: str) -> Member:
        if len(self.members) >= self.max_members:
            raise TooManyMembers(f"the daemon already tracks {self.max_members} members; raise --max-members or "
                                 f"let finished jobs age out")
        m = Member(member_id(job, rank, node), job, rank, node, pid=-1)
        self.members[m.id] = m
        return m

    # ---- the detector sweep ----
    @property
    def lag_s(self) -> float:
        """How late heartbeats are being applied (queued in sockets or behind a busy loop),
        over the last two sweeps. The dead timeout and hang budgets are extended by it, so
        an overloaded daemon reports itself slow rather than its ranks dead."""
        return max(self._lag_now, self._lag_before)

    def evaluate_now(self) -> tuple[float, dict]:
        now = self.clock()
        lag, self._lag_before, self._lag_now = self.lag_s, self._lag_now, 0.0
        members = list(self.members.values())
        for m in members:
            if m.health_dirty:
                m.health_dirty = False
                m.health_problems = health_problems(m.devices, m.host, self.cfg)
        return now, evaluate(members, now, self.cfg, lag)

    def tick(self, result: tuple[float, dict] | None = None) -> None:
        """Apply one detector sweep: new conditions become events, cleared ones `recovered`."""
        now, active = result or self.evaluate_now()
        for m in set(active) | self.flagged:
            if self.members.get(m.id) is not m:
                self.flagged.discard(m)   # forgotten or replaced while the sweep ran
                continue
            self._update(m, active.get(m, {}), active, now)
            if m.conds or m.hang_seen_at:
                self.flagged.add(m)
            else:
                self.flagged.discard(m)
        self._forget(now)

    def _update(self, m: Member, new: dict[str, str], active: dict, now: float) -> None:
        waiting = "hung" in new or "stalled" in new
        if waiting and not m.dump_id:
            # Suspects and the peers waiting on them alike: the peers' stacks show where
            # they wait. Asked once per episode.
            m.dump_id = next(self._command_ids)
            m.pending.append(pb.Command(kind=pb.COMMAND_DUMP_STACKS, id=m.dump_id,
                                        reason=new.get("hung") or new.get("stalled", "")))
        if "hung" in new and "hung" not in m.conds:
            m.hang_seen_at = m.hang_seen_at or now
            # Hold the event until the stacks are on disk (or dump_wait passes), so whoever
            # kills the job on this event kills it after the evidence is saved.
            if not m.dump_path and now - m.hang_seen_at < self.cfg.dump_wait:
                new = {k: v for k, v in new.items() if k != "hung"}
        elif "hung" not in new:
            m.hang_seen_at = 0.0
        for kind, msg in new.items():
            if kind not in m.conds and kind not in SILENT_CONDITIONS:
                self.emit(kind, m, msg, self._detail(kind, m, active))
            m.conds[kind] = msg
        for kind in [k for k in m.conds if k not in new]:
            del m.conds[kind]
            # Dead covers everything else, and a finished rank is no longer judged: only a
            # real return is news.
            if kind not in SILENT_CONDITIONS and "dead" not in new and (kind == "dead" or not m.done):
                self.emit("recovered", m, f"no longer {kind}", {"cleared": kind})
        if not waiting:
            m.dump_id, m.dump_path = 0, ""
        m.dirty = True

    def _detail(self, kind: str, m: Member, active: dict) -> dict:
        detail = {"step": max(m.step, 0), "phase": PHASE_NAMES.get(m.phase, "?"), "pid": m.pid}
        if kind == "hung":
            same_job = [(p, c) for p, c in active.items() if p.job == m.job]
            detail["suspects"] = sorted(p.rank for p, c in same_job if "hung" in c)
            detail["stalled"] = sorted(p.rank for p, c in same_job if "stalled" in c)
            detail["collectives"] = m.collectives
            detail["stacks"] = {str(p.rank): p.dump_path for p, c in same_job if p.dump_path}
        return detail

    def emit(self, kind: str, m: Member, message: str, detail: dict | None = None) -> pb.Event:
        who = f"rank {m.rank} (job {m.job}, node {m.node})" if m.rank >= 0 else f"node {m.node}"
        ev = pb.Event(id=self.next_event_id, time_unix=self.wall(), kind=EVENT_KINDS[kind], job=m.job, rank=m.rank,
                      node=m.node, message=f"{who} {kind}: {message}", detail_json=json.dumps(detail or {}))
        self.next_event_id += 1
        self.ring.append(ev)
        self.event_counts[kind] += 1
        if self.store is not None:
            self.store.add_event(ev, kind)
        for listener in list(self.listeners):
            try:
                listener(ev)
            except Exception:  # a subscriber's bug must not stop the sweep
                log.exception("health event listener %r failed", listener)
        return ev

    def _forget(self, now: float) -> None:
        gone = [m for m in self.members.values()
                if (m.done or "dead" in m.conds) and now - m.last_seen > self.cfg.forget_after_s]
        for m in gone:
            del self.members[m.id]
            self.flagged.discard(m)
        if gone and self.store is not None:
            self.store.forget([m.id for m in gone])

    # ---- read side ----
    def status(self, job: str = "") -> pb.StatusReply:
        now = self.clock()
        reply = pb.StatusReply(server_time_unix=self.wall())
        for m in list(self.members.values()):
            if job and m.job != job:
                continue
            s = reply.members.add(job=m.job, rank=m.rank, node=m.node, pid=max(m.pid, 0), state=m.state,
                                  conditions=[f"{k}: {v}" for k, v in list(m.conds.items())], step=max(m.step, 0),
                                  phase=m.phase, heartbeat_age_s=max(0.0, now - m.last_seen),
                                  collectives=max(m.collectives, 0))
            hb = m.hb
            if m.rank >= 0 and hb is not None:
                s.step_time_s, s.tokens_per_s = hb.step_time_s, hb.tokens_per_s
                if hb.HasField("mfu"):
                    s.mfu = hb.mfu
                if hb.HasField("loss"):
                    s.loss = hb.loss
        return reply

    def recent(self, since_id: int, job: str = "") -> tuple[list[pb.Event], int]:
        """Events after since_id that are still in memory, and the first id memory holds
        (older ones are in the journal)."""
        first = self.ring[0].id if self.ring else self.next_event_id
        return [e for e in self.ring if e.id > since_id and (not job or e.job == job)], first

    # ---- journal ----
    def dirty_members(self) -> list[Member]:
        out = [m for m in list(self.members.values()) if m.dirty]
        for m in out:
            m.dirty = False
        return out

    def rows(self, members: list[Member]) -> list[MemberRow]:
        """Snapshot rows; safe to build off the event loop (heartbeat messages are replaced,
        never mutated)."""
        now, wall = self.clock(), self.wall()
        rows = []
        for m in members:
            hb = m.hb
            if m.health_blob is None and (m.devices or m.host is not None):
                m.health_blob = pb.NodeHeartbeat(devices=m.devices, host=m.host).SerializeToString()
            rows.append(MemberRow(
                m.id, m.job, m.rank, m.node, m.state, json.dumps(m.conds) if m.conds else "{}",
                wall - (now - m.last_seen), wall - (now - m.last_progress),
                hb.SerializeToString() if hb is not None else None, m.health_blob,
                array("d", list(m.step_times)[-JOURNAL_STEP_TIMES:]).tobytes(), m.step_ewma, m.n_steps,
                max(0.0, m.diverged_until - now),
                m.divergence))
        return rows

    def _restore(self, store: Store) -> None:
        now, wall = self.clock(), self.wall()
        self.next_event_id = store.last_event_id() + 1
        self.ring.extend(store.events(limit=self.ring.maxlen or 0))
        for row in store.load_members():
            m = Member(row.id, row.job, row.rank, row.node)
            if row.heartbeat is not None:
                m.hb = (pb.Heartbeat if row.rank >= 0 else pb.NodeHeartbeat).FromString(row.heartbeat)
                m.pid = m.hb.pid
                if row.rank >= 0:
                    m.step, m.collectives, m.phase = m.hb.step, m.hb.collectives, m.hb.phase
                    m.nan_count, m.spike_count = m.hb.nan_count, m.hb.spike_count
                elif m.hb.leaving:
                    m.phase = pb.PHASE_DONE
            if row.health is not None:
                m.health_blob = row.health
                h = pb.NodeHeartbeat.FromString(row.health)
                m.devices, m.host, m.health_dirty = list(h.devices), (h.host if h.HasField("host") else None), True
            m.step_times.extend(array("d", row.step_times))
            m.step_ewma, m.n_steps = row.step_ewma, row.n_steps
            m.conds = json.loads(row.conds)
            m.diverged_until, m.divergence = now + row.diverging_for_s, row.divergence
            # Dead and finished members keep their age; live ones get the timeout plus a
            # grace to reconnect, since the daemon cannot know what happened while it was
            # down. A hung rank keeps its quiet time, so it stays hung if it still is.
            keep_age = "dead" in m.conds or m.done
            m.last_seen = now - (wall - row.last_seen_unix) if keep_age else now + self.cfg.restart_grace_s
            stuck = "hung" in m.conds or "stalled" in m.conds
            m.last_progress = now - (wall - row.last_progress_unix) if stuck else now
            m.hang_seen_at = now if "hung" in m.conds else 0.0
            m.dirty = False
            self.members[m.id] = m
            if m.conds:
                self.flagged.add(m)
