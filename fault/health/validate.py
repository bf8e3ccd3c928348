"""Limits on what a heartbeat may say. A message outside them is answered with
INVALID_ARGUMENT naming the field, and the daemon keeps serving; nothing absurd reaches the
detectors or the journal. Checked once per heartbeat, so the checks are plain comparisons.
"""

from __future__ import annotations

import math
import re

from suanli.fault.health.state import PHASE_NAMES
from suanli.fault.proto import health_pb2 as pb

MAX_RANK = 1 << 24
MAX_COUNT = 1 << 53          # steps, collectives: beyond this a float loses them anyway
MAX_SECONDS = 1e7            # a step time longer than ~4 months is a bug
MAX_TEXT = 4096
MAX_DEVICES = 64
MAX_BATCH = 1024             # heartbeats in one relay batch: far more ranks than any node has
JOB_RE = re.compile(r"[\w.-]{1,128}\Z")            # letters and digits of any script, . _ -
NODE_RE = re.compile(r"[\x21-\x7e]{1,253}\Z")   # printable ASCII, no spaces (hostnames, IPs, ids)

# (field, low, high) for integer and finite-float fields of a Heartbeat
HEARTBEAT_RANGES = (
    ("rank", 0, MAX_RANK - 1), ("world_size", 0, MAX_RANK), ("pid", 0, 1 << 31), ("step", 0, MAX_COUNT),
    ("collectives", 0, MAX_COUNT), ("nan_count", 0, MAX_COUNT), ("spike_count", 0, MAX_COUNT),
    ("step_time_s", 0.0, MAX_SECONDS), ("tokens_per_s", 0.0, 1e15),
)


def check_heartbeat(hb: pb.Heartbeat) -> str | None:
    """None when acceptable, else one line naming the field and the fix."""
    # The common case in one expression (this runs 10,000 times a second); the table
    # below only finds the words for what failed.
    if (0 <= hb.rank < MAX_RANK and 0 <= hb.world_size <= MAX_RANK and 0 <= hb.pid <= 1 << 31
            and 0 <= hb.step <= MAX_COUNT and 0 <= hb.collectives <= MAX_COUNT and 0 <= hb.nan_count <= MAX_COUNT
            and 0 <= hb.spike_count <= MAX_COUNT and 0.0 <= hb.step_time_s <= MAX_SECONDS
            and 0.0 <= hb.tokens_per_s <= 1e15 and (hb.rank < hb.world_size or not hb.world_size)
            and hb.phase in PHASE_NAMES and JOB_RE.match(hb.job) and NODE_RE.match(hb.node)
            and len(hb.run_dir) <= MAX_TEXT and len(hb.dump_path) <= MAX_TEXT and not hb.HasField("mfu")
            and not hb.devices and not hb.HasField("host")):
        return None
    return _explain(hb)


def _explain(hb: pb.Heartbeat) -> str | None:
    if not JOB_RE.match(hb.job):
        return f"heartbeat.job={hb.job[:40]!r}: use 1-128 letters, digits, '.', '_' or '-'"
    if not NODE_RE.match(hb.node):
        return f"heartbeat.node={hb.node[:40]!r}: use 1-253 printable characters without spaces (the hostname)"
    for name, lo, hi in HEARTBEAT_RANGES:
        v = getattr(hb, name)
        if not lo <= v <= hi:  # also false for NaN
            return f"heartbeat.{name}={v!r}: must be within [{lo}, {hi}]"
    if hb.world_size and hb.rank >= hb.world_size:
        return f"heartbeat.rank={hb.rank}: must be below world_size={hb.world_size}"
    if hb.HasField("mfu") and not 0.0 <= hb.mfu <= 100.0:
        return f"heartbeat.mfu={hb.mfu!r}: must be a fraction within [0, 100] (leave it unset when the peak is unknown)"
    if hb.phase not in PHASE_NAMES:
        return f"heartbeat.phase={hb.phase}: unknown phase; use one of {sorted(PHASE_NAMES)}"
    if len(hb.run_dir) > MAX_TEXT or len(hb.dump_path) > MAX_TEXT:
        return f"heartbeat.run_dir/dump_path: longer than {MAX_TEXT} characters"
    if hb.devices or hb.HasField("host"):
        return check_health_fields("heartbeat", hb.devices, hb.host if hb.HasField("host") else None)
    return None


def check_batch(batch: pb.HeartbeatBatch) -> str | None:
    """A relay's batch: its size, then every heartbeat as check_heartbeat would judge it
    on its own stream, the failing one named by index and rank."""
    if len(batch.heartbeats) > MAX_BATCH:
        return (f"heartbeat_batch.heartbeats: {len(batch.heartbeats)} heartbeats, at most {MAX_BATCH}; "
                f"split the batch")
    for i, hb in enumerate(batch.heartbeats):
        err = check_heartbeat(hb)
        if err:
            return f"heartbeat_batch.heartbeats[{i}] (job {hb.job[:40]!r}, rank {hb.rank}): {err}"
    if batch.HasField("node"):
        err = check_node_heartbeat(batch.node)
        if err:
            return f"heartbeat_batch.{err}"
    return None


def check_node_heartbeat(nhb: pb.NodeHeartbeat) -> str | None:
    if not NODE_RE.match(nhb.node):
        return f"node_heartbeat.node={nhb.node[:40]!r}: use 1-253 printable characters without spaces (the hostname)"
    if not 0 <= nhb.pid <= 1 << 31:
        return f"node_heartbeat.pid={nhb.pid}: must be within [0, 2147483648]"
    return check_health_fields("node_heartbeat", nhb.devices, nhb.host if nhb.HasField("host") else None)


def check_health_fields(what: str, devices, host) -> str | None:
    if len(devices) > MAX_DEVICES:
        return f"{what}.devices: {len(devices)} devices, at most {MAX_DEVICES}"
    for d in devices:
        for name in ("temperature_c", "power_w", "utilization_pct"):
            if d.HasField(name) and not math.isfinite(getattr(d, name)):
                return f"{what}.devices[{d.index}].{name}: must be finite (leave it unset when unknown)"
        for name in ("memory_used_bytes", "memory_total_bytes", "ecc_errors_corrected", "ecc_errors_uncorrected"):
            if d.HasField(name) and getattr(d, name) < 0:
                return f"{what}.devices[{d.index}].{name}: must not be negative"
        if len(d.name) > 256 or len(d.source) > 64:
            return f"{what}.devices[{d.index}].name/source: too long"
    if host is not None:
        if not (math.isfinite(host.cpu_percent) and math.isfinite(host.load1)):
            return f"{what}.host.cpu_percent/load1: must be finite"
        for name in ("memory_used_bytes", "memory_total_bytes", "disk_free_bytes", "disk_total_bytes"):
            if getattr(host, name) < 0:
                return f"{what}.host.{name}: must not be negative"
        if len(host.disk_path) > MAX_TEXT:
            return f"{what}.host.disk_path: longer than {MAX_TEXT} characters"
    return None
