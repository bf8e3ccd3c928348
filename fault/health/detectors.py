"""The detectors: which members are dead, hung, straggling, diverging or unhealthy.

They run on a timer over the daemon's in-memory `Member` records (never per heartbeat) and
return the conditions active now; the daemon turns changes into events. All thresholds
live in `DetectorConfig`; its defaults are the documented ones:

| condition  | rule (defaults)                                                                  |
|------------|----------------------------------------------------------------------------------|
| dead       | no heartbeat for `dead_after_s` (3 x `interval_s` = 3 s) plus the daemon's lag    |
|            | (how late it applies heartbeats, net of each sender's clock offset); after a      |
|            | daemon restart, ranks get `restart_grace_s` (5 s) more to reconnect              |
| hung       | heartbeats arrive but step and collective counter have not moved for the budget   |
|            | max(`hang_k` x rolling p99 step time, `hang_floor_s`) = max(3 x p99, 10 s);        |
|            | `checkpoint_budget_s` (600 s) in the checkpoint phase, `startup_budget_s` (600 s) |
|            | before the first step. The suspect is the stalled rank whose (step, collectives)  |
|            | lags its peers; with no lag, the rank in a minority phase; else every stalled one.|
| stalled    | a rank past its budget that is not the suspect (waiting on it); no event          |
| straggler  | step-time average >= `straggler_factor` (1.5) x the peers' median for             |
|            | `straggler_persist_s` (10 s), after `straggler_min_steps` (3) steps; clears below |
|            | `straggler_clear_factor` (1.25)                                                   |
| diverging  | non-finite loss, or the guard's NaN/spike counters grew, within `diverging_hold_s`|
| unhealthy  | device >= `max_temp_c` (90 C), uncorrected ECC > `max_ecc_uncorrected` (0), host  |
|            | memory >= `max_host_memory_pct` (97 %), disk free < `min_disk_free_bytes` (1 GiB) |
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable

from suanli.fault.health.state import PHASE_NAMES, Member
from suanli.fault.proto import health_pb2 as pb


@dataclass
class DetectorConfig:
    interval_s: float = 1.0               # heartbeat interval the reporters use
    dead_after_s: float = 0.0             # 0 = 3 x interval_s
    hang_k: float = 3.0
    hang_floor_s: float = 10.0
    checkpoint_budget_s: float = 600.0
    startup_budget_s: float = 600.0
    straggler_factor: float = 1.5
    straggler_clear_factor: float = 1.25
    straggler_persist_s: float = 10.0
    straggler_min_steps: int = 3
    diverging_hold_s: float = 60.0
    max_temp_c: float = 90.0
    max_ecc_uncorrected: int = 0
    max_host_memory_pct: float = 97.0
    min_disk_free_bytes: int = 1 << 30
    dump_wait_s: float = 0.0              # 0 = 3 x interval_s: how long a hung event waits for stack dumps
    tick_s: float = 0.5                   # how often the detectors run
    forget_after_s: float = 3600.0        # drop members done or dead this long
    restart_grace_s: float = 5.0          # after a daemon restart, extra time for ranks to reconnect

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v < 0 or (f.name in ("interval_s", "tick_s", "hang_k", "straggler_factor") and v <= 0):
                raise ValueError(f"detector setting {f.name}={v!r} must be positive")
        if self.straggler_clear_factor > self.straggler_factor:
            raise ValueError(f"detector setting straggler_clear_factor={self.straggler_clear_factor} must not exceed "
                             f"straggler_factor={self.straggler_factor}")

    @property
    def dead_timeout(self) -> float:
        return self.dead_after_s or 3.0 * self.interval_s

    @property
    def dump_wait(self) -> float:
        return self.dump_wait_s or 3.0 * self.interval_s

    @classmethod
    def from_pairs(cls, pairs: Iterable[str], **base) -> "DetectorConfig":
        """Build from `name=value` strings (the CLI's --detector option)."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values = dict(base)
        for pair in pairs:
            name, sep, raw = pair.partition("=")
            name = name.strip()
            if not sep or name not in types:
                raise ValueError(f"--detector {pair!r}: expected NAME=VALUE with NAME one of {', '.join(types)}")
            try:
                values[name] = int(raw) if types[name] in (int, "int") else float(raw)
            except ValueError:
                raise ValueError(f"--detector {name}: {raw!r} is not a number") from None
        return cls(**values)


Conditions = dict[Member, dict[str, str]]


def evaluate(members: Iterable[Member], now: float, cfg: DetectorConfig, lag_s: float = 0.0) -> Conditions:
    """Conditions active now, for the members that have any. lag_s: how late the daemon is
    applying heartbeats; silence that long is the daemon's, not the rank's."""
    out: Conditions = defaultdict(dict)
    jobs: dict[str, list[Member]] = defaultdict(list)
    dead_after = cfg.dead_timeout + lag_s
    seen_by = now - dead_after    # last_seen below this: dead (one comparison per member)
    done = pb.PHASE_DONE
    for m in members:   # the daemon runs this on its event loop: ~1 us a member matters
        if m.phase == done:
            continue
        if m.last_seen < seen_by:
            out[m]["dead"] = f"no heartbeat for {now - m.last_seen:.1f} s (timeout {cfg.dead_timeout:g} s)"
        else:
            if m.health_problems:
                out[m]["unhealthy"] = m.health_problems
            if now < m.diverged_until:
                out[m]["diverging"] = m.divergence
        if m.rank >= 0:
            jobs[m.job].append(m)
    for ranks in jobs.values():
        alive = [m for m in ranks if "dead" not in out.get(m, ())]
        _hangs(alive, len(alive) < len(ranks), now - lag_s, cfg, out)
        _stragglers(alive, now, cfg, out)
    return {m: c for m, c in out.items() if c}


def hang_budget(m: Member, cfg: DetectorConfig) -> float:
    if m.phase == pb.PHASE_CHECKPOINT:
        return cfg.checkpoint_budget_s
    if m.n_steps == 0:
        return cfg.startup_budget_s
    times = sorted(m.step_times)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    return max(cfg.hang_k * p99, cfg.hang_floor_s)


def _hangs(alive: list[Member], peer_dead: bool, now: float, cfg: DetectorConfig, out: Conditions) -> None:
    floor = min(cfg.hang_floor_s, cfg.checkpoint_budget_s, cfg.startup_budget_s)
    stalled = [m for m in alive if now - m.last_progress > floor and now - m.last_progress > hang_budget(m, cfg)]
    if not stalled:
        return
    if peer_dead:
        # A dead peer explains the wait; naming a live suspect would send people the wrong way.
        for m in stalled:
            out[m]["stalled"] = f"no progress for {now - m.last_progress:.1f} s; a peer is dead"
        return
    suspects = _suspects(alive, stalled)
    lo = min((m.step, m.collectives) for m in alive)
    for m in stalled:
        quiet = now - m.last_progress
        if m in suspects:
            out[m]["hung"] = (f"no progress for {quiet:.1f} s at step {m.step} (collectives {m.collectives}, "
                              f"phase {PHASE_NAMES.get(m.phase, '?')}); suspect")
        else:
            out[m]["stalled"] = f"no progress for {quiet:.1f} s; waiting on the suspect (lowest step/collectives {lo[0]}/{lo[1]})"


def _suspects(alive: list[Member], stalled: list[Member]) -> set[Member]:
    keys = {m: (m.step, m.collectives) for m in alive}
    lo, hi = min(keys.values()), max(keys.values())
    if lo < hi:
        lagging = {m for m in stalled if keys[m] == lo}
        if lagging:
            return lagging
    phases = Counter(m.phase for m in alive)
    if len(phases) > 1:
        common = phases.most_common(1)[0][0]
        odd = {m for m in stalled if m.phase != common}
        if odd:
            return odd
    return set(stalled)


def _stragglers(alive: list[Member], now: float, cfg: DetectorConfig, out: Conditions) -> None:
    eligible = [m for m in alive if m.n_steps >= cfg.straggler_min_steps]
    if len(eligible) < 2:
        # No peers left to compare with (they finished): unknown is not "recovered".
        for m in eligible:
            if "straggler" in m.conds:
                out[m]["straggler"] = m.conds["straggler"]
        return
    v = sorted(m.step_ewma for m in eligible)
    h = (len(v) - 1) // 2          # middle of the n-1 peers left when one rank is set aside
    odd = (len(v) - 1) % 2 == 1
    for m in eligible:
        x = m.step_ewma
        # The peers' median without this rank, in O(1): removing x shifts the middle index
        # by one exactly when x sorts below it.
        if odd:
            med = v[h] if x > v[h] else v[h + 1]
        else:
            med = 0.5 * ((v[h - 1] if x > v[h - 1] else v[h]) + (v[h] if x > v[h] else v[h + 1]))
        ratio = x / med if med > 0 else 0.0
        active = "straggler" in m.conds
        if ratio >= (cfg.straggler_clear_factor if active else cfg.straggler_factor):
            m.slow_since = m.slow_since or now
            if active or now - m.slow_since >= cfg.straggler_persist_s:
                out[m]["straggler"] = f"step time {x:.3f} s is {ratio:.2f}x the peers' median {med:.3f} s"
        else:
            m.slow_since = 0.0


def health_problems(devices, host, cfg: DetectorConfig) -> str:
    """One line naming every limit a member's devices or host exceed ("" when healthy)."""
    problems = []
    for d in devices:
        for field_name, over, text in _DEVICE_CHECKS:
            if d.HasField(field_name) and over(getattr(d, field_name), cfg):
                problems.append(text(d, cfg))
    if host is not None:
        for over, text in _HOST_CHECKS:
            if over(host, cfg):
                problems.append(text(host, cfg))
    return "; ".join(problems)


_DEVICE_CHECKS = [
    ("temperature_c", lambda v, c: v >= c.max_temp_c,
     lambda d, c: f"device {d.index} at {d.temperature_c:.0f} C (limit {c.max_temp_c:g} C)"),
    ("ecc_errors_uncorrected", lambda v, c: v > c.max_ecc_uncorrected,
     lambda d, c: f"device {d.index} has {d.ecc_errors_uncorrected} uncorrected ECC errors (limit {c.max_ecc_uncorrected})"),
]

_HOST_CHECKS = [
    (lambda h, c: h.memory_total_bytes > 0 and 100.0 * h.memory_used_bytes / h.memory_total_bytes >= c.max_host_memory_pct,
     lambda h, c: f"host memory {100.0 * h.memory_used_bytes / h.memory_total_bytes:.1f}% used (limit {c.max_host_memory_pct:g}%)"),
    (lambda h, c: h.disk_total_bytes > 0 and h.disk_free_bytes < c.min_disk_free_bytes,
     lambda h, c: f"disk {h.disk_path or '?'} has {h.disk_free_bytes / 2**30:.2f} GiB free (limit {c.min_disk_free_bytes / 2**30:.2f} GiB)"),
]
