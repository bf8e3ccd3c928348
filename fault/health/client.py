"""Talking to a running daemon: channels (token, TLS, fast reconnects), the read-side
client behind `suanli health status|events`, and how their results are printed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterator

import grpc

from suanli.fault.health.auth import call_metadata, client_credentials, split_host_port
from suanli.fault.health.state import EVENT_NAMES, PHASE_NAMES
from suanli.fault.proto import health_pb2 as pb
from suanli.fault.proto import health_pb2_grpc as pbg

DEFAULT_ADDR = "127.0.0.1:50051"
ADDR_ENV = "SUANLI_HEALTH_ADDR"
TOKEN_FILE_ENV = "SUANLI_HEALTH_TOKEN_FILE"
RELAY_ENV = "SUANLI_HEALTH_RELAY"   # this node's relay (`suanli health agent --relay-bind`)

CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff grows to 2 minutes; a restarted daemon must get
    # its ranks back within the dead timeout (seconds).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Notice a daemon host that vanished without closing TCP.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 256 << 20),   # status of 100k+ ranks
]


def default_addr() -> str:
    return os.environ.get(ADDR_ENV) or DEFAULT_ADDR


def make_channel(addr: str, tls_ca: str | None = None, server_name: str | None = None, aio: bool = False):
    split_host_port(addr, "--addr")
    mod = grpc.aio if aio else grpc
    creds = client_credentials(tls_ca)
    opts = list(CHANNEL_OPTIONS)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return mod.secure_channel(addr, creds, options=opts) if creds else mod.insecure_channel(addr, options=opts)


def _fail(addr: str, e: grpc.RpcError) -> RuntimeError:
    return RuntimeError(f"health daemon at {addr}: {e.code().name}: {e.details()}")


class HealthClient:
    def __init__(self, addr: str | None = None, token: str | None = None, tls_ca: str | None = None,
                 timeout_s: float = 10.0, server_name: str | None = None) -> None:
        self.addr = addr or default_addr()
        self.channel = make_channel(self.addr, tls_ca, server_name)
        self.stub = pbg.HealthStub(self.channel)
        self.metadata = call_metadata(token)
        self.timeout_s = timeout_s

    def status(self, job: str = "") -> pb.StatusReply:
        try:
            return self.stub.Status(pb.StatusRequest(job=job), timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _fail(self.addr, e) from None

    def events(self, since_id: int = 0, job: str = "", follow: bool = False, limit: int = 0,
               reconnect: bool = True) -> Iterator[pb.Event]:
        """Past events after since_id, then (follow) new ones as they happen. While
        following, a lost daemon is retried every second and the stream resumes after the
        last event seen."""
        last = since_id
        while True:
            try:
                req = pb.WatchRequest(job=job, since_id=last, follow=follow, limit=limit)
                for ev in self.stub.Watch(req, metadata=self.metadata, timeout=None if follow else self.timeout_s):
                    last = ev.id
                    yield ev
                return
            except grpc.RpcError as e:
                if not (follow and reconnect and e.code() == grpc.StatusCode.UNAVAILABLE):
                    raise _fail(self.addr, e) from None
                limit = 0
                time.sleep(1.0)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "HealthClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- presentation ----
def member_dict(s: pb.MemberStatus) -> dict:
    return {"job": s.job, "rank": s.rank, "node": s.node, "pid": s.pid, "state": s.state,
            "conditions": list(s.conditions), "step": s.step, "phase": PHASE_NAMES.get(s.phase, "?"),
            "heartbeat_age_s": round(s.heartbeat_age_s, 3), "step_time_s": s.step_time_s,
            "tokens_per_s": s.tokens_per_s, "mfu": s.mfu if s.HasField("mfu") else None,
            "loss": s.loss if s.HasField("loss") else None, "collectives": s.collectives}


def event_dict(ev: pb.Event) -> dict:
    return {"id": ev.id, "time": ev.time_unix, "kind": EVENT_NAMES.get(ev.kind, "?"), "job": ev.job, "rank": ev.rank,
            "node": ev.node, "message": ev.message, "detail": json.loads(ev.detail_json or "{}")}


STATUS_COLUMNS = [  # header, width, value
    ("JOB", 12, lambda d: d["job"] or "-"),
    ("RANK", 6, lambda d: str(d["rank"]) if d["rank"] >= 0 else "node"),
    ("STATE", 10, lambda d: d["state"]),
    ("STEP", 8, lambda d: str(d["step"])),
    ("PHASE", 10, lambda d: d["phase"] if d["rank"] >= 0 else "-"),
    ("HB AGE", 8, lambda d: f"{d['heartbeat_age_s']:.1f}s"),
    ("STEP TIME", 10, lambda d: f"{d['step_time_s']:.3f}s" if d["step_time_s"] else "-"),
    ("NODE", 16, lambda d: d["node"]),
    ("CONDITIONS", 0, lambda d: "; ".join(d["conditions"])),
]


def format_status(reply: pb.StatusReply) -> str:
    rows = sorted((member_dict(s) for s in reply.members), key=lambda d: (d["job"], d["rank"] < 0, d["rank"], d["node"]))
    if not rows:
        return "no ranks or node agents have reported yet"
    line = lambda cells: "  ".join(c.ljust(w) if w else c for c, (_, w, _) in zip(cells, STATUS_COLUMNS)).rstrip()
    out = [line([h for h, _, _ in STATUS_COLUMNS])]
    out += [line([fn(d) for _, _, fn in STATUS_COLUMNS]) for d in rows]
    return "\n".join(out)


def format_event(ev: pb.Event) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.time_unix))
    return f"{ev.id:>6}  {stamp}  {EVENT_NAMES.get(ev.kind, '?'):<10} {ev.message}"
