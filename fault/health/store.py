"""The daemon's journal: every event and the last state of every member, in SQLite (WAL).

A restarted daemon reads it back and carries on, so nothing is lost and ranks just
reconnect. Writes happen on one background thread: events are committed as soon as they
arrive (an event is never only in memory for long), member snapshots in batches the
daemon hands over every journal interval (one upsert per changed member per batch, never
one per heartbeat).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from pathlib import Path
from typing import NamedTuple

from suanli.fault.proto import health_pb2 as pb

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, kind TEXT NOT NULL, job TEXT NOT NULL,
    rank INTEGER NOT NULL, node TEXT NOT NULL, message TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    id TEXT PRIMARY KEY, job TEXT NOT NULL, rank INTEGER NOT NULL, node TEXT NOT NULL,
    state TEXT NOT NULL, conds TEXT NOT NULL, last_seen REAL NOT NULL, last_progress REAL NOT NULL,
    heartbeat BLOB, health BLOB, step_times BLOB NOT NULL, step_ewma REAL NOT NULL, n_steps INTEGER NOT NULL,
    diverging_for_s REAL NOT NULL, divergence TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA_VERSION = "1"


class MemberRow(NamedTuple):
    """One member's journaled state; a plain tuple, so 10,000 of them a second stay cheap."""

    id: str
    job: str
    rank: int
    node: str
    state: str
    conds: str                  # JSON {condition: message}
    last_seen_unix: float
    last_progress_unix: float
    heartbeat: bytes | None     # serialized Heartbeat (rank) or NodeHeartbeat (node)
    health: bytes | None        # serialized NodeHeartbeat holding the last devices + host
    step_times: bytes           # float64 array of recent step times
    step_ewma: float
    n_steps: int
    diverging_for_s: float      # how much longer a divergence flag stays raised
    divergence: str


def connect(path: Path | str) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA cache_size=-32000")    # 32 MB: a 10,000-rank snapshot stays in cache
    return db


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = connect(self.path)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"--db {self.path}: not a usable SQLite database ({e}); pass a new path") from None
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise ValueError(f"--db {self.path}: schema version {row[0]}, this daemon writes {SCHEMA_VERSION}; pass a new path")
        self._q: queue.Queue = queue.Queue()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="health-journal", daemon=True)
        self._thread.start()

    # ---- reading (at start-up, and history older than the in-memory ring) ----
    def load_members(self) -> list[MemberRow]:
        return [MemberRow(*r) for r in self.db.execute("SELECT * FROM members").fetchall()]

    def events(self, since_id: int = 0, until_id: int | None = None, job: str = "", limit: int = 0) -> list[pb.Event]:
        """Events with since_id < id (< until_id), oldest first; the newest `limit` if set."""
        from suanli.fault.health.state import EVENT_KINDS

        sql, args = "SELECT id, time, kind, job, rank, node, message, detail FROM events WHERE id > ?", [since_id]
        if until_id is not None:
            sql += " AND id < ?"
            args.append(until_id)
        if job:
            sql += " AND job = ?"
            args.append(job)
        sql += " ORDER BY id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with_reader = connect(self.path)  # its own connection: safe from any thread
        try:
            rows = with_reader.execute(sql, args).fetchall()
        finally:
            with_reader.close()
        return [pb.Event(id=r[0], time_unix=r[1], kind=EVENT_KINDS.get(r[2], 0), job=r[3], rank=r[4], node=r[5],
                         message=r[6], detail_json=r[7]) for r in reversed(rows)]

    def last_event_id(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]

    # ---- writing (queued; the journal thread commits) ----
    def add_event(self, ev: pb.Event, kind: str) -> None:
        self._q.put(("event", (ev.id, ev.time_unix, kind, ev.job, ev.rank, ev.node, ev.message, ev.detail_json)))

    def put_members(self, rows: list[MemberRow]) -> None:
        if rows:
            self._q.put(("members", rows))

    def forget(self, ids: list[str]) -> None:
        if ids:
            self._q.put(("forget", [(i,) for i in ids]))

    def flush(self, timeout: float = 10.0) -> None:
        done = threading.Event()
        self._q.put(("flush", done))
        done.wait(timeout)

    def close(self) -> None:
        self._q.put(("stop", None))
        self._thread.join(30)
        self.db.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._q.get()]
            while True:  # everything already queued goes into one transaction
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            waiters = []
            try:
                self.db.execute("BEGIN")
                for op, arg in batch:
                    if op == "event":
                        self.db.execute("INSERT OR REPLACE INTO events VALUES (?,?,?,?,?,?,?,?)", arg)
                    elif op == "members":
                        self.db.executemany("INSERT OR REPLACE INTO members VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", arg)
                    elif op == "forget":
                        self.db.executemany("DELETE FROM members WHERE id = ?", arg)
                    elif op == "flush":
                        waiters.append(arg)
                    elif op == "stop":
                        stop = True
                self.db.execute("COMMIT")
            except sqlite3.Error as e:  # disk full, locked: keep the daemon up, report at /metrics and stop
                self.error = e
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for w in waiters:
                w.set()
