"""`events.jsonl`: the run directory's journal of things that happened to a run (resumed,
rolled back, skipped data, a dead rank, ...), one JSON object per line.

Generic on purpose: any subsystem appends with `append_event(run_dir, kind, **fields)`.
Only one process per run should write (rank 0, or the health daemon); each line is
written with one `write` call, flushed and fsynced, so a crash loses at most the line
being written and never corrupts earlier ones.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"


def append_event(run_dir: str | os.PathLike, kind: str, **fields) -> dict:
    """Append one event; returns it. `time` (Unix seconds) is added when not given."""
    event = {"time": fields.pop("time", round(time.time(), 3)), "kind": kind, **fields}
    path = Path(run_dir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(event, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return event


def read_events(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """All events (of one kind, if given), oldest first. A torn last line (a crash while
    appending) is ignored rather than failing every later reader."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(e, dict) and (kind is None or e.get("kind") == kind):
            events.append(e)
    return events


__all__ = ["append_event", "read_events", "EVENTS_FILE"]
