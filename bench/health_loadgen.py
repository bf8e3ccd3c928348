"""Load-generator side of the health daemon load benchmark (bench/health_load.py).

This code runs in the child processes that bench/health_load.py starts: load generators
(`python -m suanli.bench.health_load --generator ...`) and, for the control, the bare server
(`python -m suanli.bench.health_load --bare-server ADDR`). The benchmark's entry point, what it
measures and how to run it are in bench/health_load.py.

A generator process runs its share of the simulated ranks (`SimRank`), or of the simulated
node relays (`SimNode`) in node mode: it prints "ready", reads the common start time from
stdin, sends heartbeats until one second after the measurement window and writes what it saw
(`GenResult`) as JSON to its `--result` file.

Load generator: each simulated rank has its own HTTP/2 stream on one of `--channels`
connections, as a real reporter has its own Report call. The default client (`--client h2`)
is a small HTTP/2 framer written for this benchmark: it sends the same gRPC-framed bytes as
grpc would, but all heartbeats due in the same 5 ms slot go out in one socket write, so the
generator costs a few microseconds per heartbeat instead of grpc Python's ~100; on two
shared cores that is the difference between measuring the daemon and measuring the load
generator. `--client aio` uses grpc.aio (one call per rank) as a cross-check.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

INTERVAL_S = 1.0


@dataclass
class GenResult:
    latencies_ms: list = field(default_factory=list)
    lag_ms: list = field(default_factory=list)
    sent: int = 0
    errors: int = 0
    first_error: str = ""
    killed_at: float = 0.0
    cpu_s: float = 0.0
    flow_blocked: int = 0     # heartbeats that waited for the daemon's HTTP/2 flow-control window
    window_heartbeats: int = 0   # rank heartbeats sent inside the measurement window


class SimRank:
    """One simulated rank: its heartbeat message and schedule."""

    def __init__(self, rank: int, a, t0: float) -> None:
        from suanli.fault.proto import health_pb2 as pb

        rng = random.Random(rank)
        self.rank, self.start = rank, t0 + rng.uniform(0, a.ramp)
        self.next_t, self.seq = self.start, 0
        self.kill_at = t0 + a.ramp + a.settle + a.duration / 2 if rank == a.kill_rank else None
        step_time = 1.0 + rng.uniform(-0.03, 0.03)   # peers within 3%: no stragglers
        node = f"sim{rank // (a.ranks_per_node or 8):05d}"
        self.hb = pb.Heartbeat(job=a.job, rank=rank, world_size=a.total, node=node,
                               pid=100_000 + rank, phase=pb.PHASE_FORWARD, step_time_s=step_time,
                               tokens_per_s=4096 / step_time, run_dir="/sim")

    def beat(self, now: float, ack: bool):
        """Advance to the next heartbeat (step and collectives move; host metrics every 10th)."""
        self.seq += 1
        hb = self.hb
        hb.seq, hb.step, hb.collectives, hb.sent_unix, hb.ack = self.seq, self.seq, 3 * self.seq, now, ack
        if self.seq % 10 == 1:
            hb.host.CopyFrom(HOST)
        else:
            hb.ClearField("host")
        return hb

    def final(self) -> bytes | None:
        """The clean finish (phase done: never reported dead); None for the killed rank."""
        from suanli.fault.proto import health_pb2 as pb

        if self.kill_at is not None:
            return None
        self.hb.phase, self.hb.ack = pb.PHASE_DONE, False
        return self.hb.SerializeToString()


class SimNode:
    """node mode: one simulated node relay, one ReportBatch stream, one batch of its ranks'
    heartbeats (plus its node heartbeat) a second at its phase. The killed rank is simply
    left out of the batches from kill_at on, as a relay does when a rank's stream ends."""

    def __init__(self, ranks: list[SimRank], a) -> None:
        from suanli.fault.proto import health_pb2 as pb

        self.ranks, self.rank = ranks, ranks[0].rank
        # Phase: the node's first rank's start, spread over the ramp like the per-rank starts.
        self.start = self.next_t = min(r.start for r in ranks)
        self.seq = 0
        self.kill_at = min((r.kill_at for r in ranks if r.kill_at is not None), default=None)
        # Host metrics every time, as the agent sends them.
        self.node = pb.NodeHeartbeat(node=ranks[0].hb.node, pid=90_000 + self.rank, host=HOST)

    def beat(self, now: float, ack: bool):
        from suanli.fault.proto import health_pb2 as pb

        self.seq += 1
        self.node.seq, self.node.sent_unix = self.seq, now
        batch = pb.HeartbeatBatch(seq=self.seq, sent_unix=now, ack=ack, node=self.node)
        batch.heartbeats.extend(r.beat(now, False) for r in self.ranks)
        return batch

    def drop_killed(self) -> None:
        self.ranks = [r for r in self.ranks if r.kill_at is None]
        self.kill_at = None

    def final(self) -> bytes | None:
        from suanli.fault.proto import health_pb2 as pb

        self.node.leaving = True   # the relay's clean goodbye: its node is not dead either
        batch = pb.HeartbeatBatch(seq=self.seq + 1, node=self.node)
        batch.heartbeats.extend(pb.Heartbeat.FromString(m) for m in (r.final() for r in self.ranks) if m is not None)
        return batch.SerializeToString()


def _host():
    from suanli.fault.proto import health_pb2 as pb

    return pb.HostMetrics(cpu_percent=12.5, memory_used_bytes=64 << 30, memory_total_bytes=512 << 30, disk_path="/",
                          disk_free_bytes=900 << 30, disk_total_bytes=2 << 40, load1=3.0)


HOST = None


async def _rank_stream(stub, sim: SimRank, a, res: GenResult) -> None:
    """per-rank mode: the rank has its own stream, as a real reporter does."""
    from suanli.fault.proto import health_pb2 as pb

    await asyncio.sleep(max(0.0, sim.start - time.time()))
    call = None
    while True:
        now = time.time()
        if now >= a.win1 + 1.0:
            break
        if sim.kill_at is not None and now >= sim.kill_at:
            if call is not None:
                call.cancel()   # like a killed process: no goodbye, the stream just drops
            res.killed_at = time.time()
            return
        try:
            if call is None:
                call = stub.Report(metadata=a.metadata)
            hb = sim.beat(now, (sim.seq + sim.rank) % a.ack_every == 0)
            in_window = a.win0 <= now < a.win1
            if in_window:
                res.lag_ms.append((now - sim.next_t) * 1e3)
                res.window_heartbeats += 1
            t = time.perf_counter()
            await call.write(hb)
            res.sent += 1
            if hb.ack:
                await call.read()
                if in_window:
                    res.latencies_ms.append((time.perf_counter() - t) * 1e3)
        except Exception as e:  # a lost stream: count it, reopen
            res.errors += 1
            res.first_error = res.first_error or f"{type(e).__name__}: {e}"[:300]
            call = None
        sim.next_t += INTERVAL_S
        await asyncio.sleep(max(0.0, sim.next_t - time.time()))
    if call is not None:
        sim.hb.phase, sim.hb.ack = pb.PHASE_DONE, False   # a clean finish: never reported dead
        try:
            await call.write(sim.hb)
            await call.done_writing()
        except Exception:
            pass


# ---- a raw HTTP/2 gRPC client: the load generator must not need more CPU than the daemon ----
# grpc's Python client spends ~100 us of CPU per streamed message (a syscall and two thread
# hand-offs each); on the same two cores as the daemon that would measure the generator.
# This client opens one HTTP/2 stream per simulated rank, exactly as a reporter does, and
# writes the same gRPC-framed Heartbeat bytes, but sends every heartbeat due in a 5 ms slot
# with one socket write. The daemon cannot tell the difference.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
BIG_WINDOW = (1 << 31) - 1
SLOT_S = 0.005   # heartbeats due within one slot share a socket write


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _literal(name: str, value: str) -> bytes:
    """HPACK 'literal header field without indexing, new name' (no dynamic table, no Huffman)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes((len(n),)) + n + bytes((len(v),)) + v


class H2Client(asyncio.Protocol):
    def __init__(self, sims: list, a, res: GenResult) -> None:
        from suanli.fault.proto import health_pb2 as pb

        self.sims, self.a, self.res = sims, a, res
        self.buf = b""
        self.streams: dict[int, SimRank] = {}
        self.rx: dict[int, bytes] = {}
        self.pending: dict[tuple[int, int], tuple[float, bool]] = {}
        self.conn_window, self.stream_window_init = 65535, 65535
        self.stream_window: dict[int, int] = {}
        self.blocked: list[tuple[int, bytes]] = []
        self.next_stream = 1
        self.sid_of: dict[int, int] = {}
        self.finishing = False
        self.ended = self.finishing_streams = 0   # streams closed by the daemon after our goodbye
        self.transport = None
        self.nodes = bool(a.ranks_per_node)
        self.reply_cls = pb.ReportBatchReply if self.nodes else pb.ReportReply
        method = "ReportBatch" if self.nodes else "Report"
        self.headers = b"".join(_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", f"/suanli.health.v1.Health/{method}"),
            (":authority", a.addr), ("content-type", "application/grpc"), ("te", "trailers")))

    def connection_made(self, transport) -> None:
        self.transport = transport
        settings = (0x2).to_bytes(2, "big") + (0).to_bytes(4, "big") + (0x4).to_bytes(2, "big") + BIG_WINDOW.to_bytes(4, "big")
        transport.write(H2_PREFACE + _frame(SETTINGS, 0, 0, settings)
                        + _frame(WINDOW_UPDATE, 0, 0, (BIG_WINDOW - 65535).to_bytes(4, "big")))

    def error(self, what: str) -> None:
        self.res.errors += 1
        self.res.first_error = self.res.first_error or what

    def connection_lost(self, exc) -> None:
        if exc is not None:
            self.error(f"connection lost: {exc}")

    # ---- receiving ----
    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            kind, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload, buf = buf[9:9 + n], buf[9 + n:]
            if kind == DATA:
                self._data(sid, payload)
            elif kind == HEADERS and flags & END_STREAM and sid in self.streams:
                if self.finishing:
                    self.ended += 1
                else:
                    self.error(f"the daemon ended rank {self.streams[sid].rank}'s stream")
            elif kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    if int.from_bytes(payload[i:i + 2], "big") == 0x4:
                        self.stream_window_init = int.from_bytes(payload[i + 2:i + 6], "big")
                self.transport.write(_frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.transport.write(_frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE:
                inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                if sid == 0:
                    self.conn_window += inc
                else:
                    self.stream_window[sid] = self.stream_window.get(sid, self.stream_window_init) + inc
                self.flush_blocked()
            elif kind == RST_STREAM:
                self.error(f"stream {sid} reset by the daemon (code {int.from_bytes(payload[:4], 'big')})")
            elif kind == GOAWAY:
                self.error(f"GOAWAY from the daemon: {payload[8:].decode(errors='replace')[:200]}")
        self.buf = buf

    def _data(self, sid: int, payload: bytes) -> None:
        buf = self.rx.get(sid, b"") + payload
        while len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[1:5], "big"):
            n = int.from_bytes(buf[1:5], "big")
            reply = self.reply_cls.FromString(buf[5:5 + n])
            buf = buf[5 + n:]
            t = self.pending.pop((sid, reply.seq), None)
            if t is not None and t[1]:
                self.res.latencies_ms.append((time.perf_counter() - t[0]) * 1e3)
        self.rx[sid] = buf

    # ---- sending ----
    def send_data(self, sid: int, msg: bytes, flags: int = 0) -> bytes | None:
        body = b"\x00" + len(msg).to_bytes(4, "big") + msg if msg or not flags else b""
        window = self.stream_window.get(sid, self.stream_window_init)
        if self.blocked or len(body) > self.conn_window or len(body) > window:
            self.blocked.append((sid, _frame(DATA, flags, sid, body)))
            self.res.flow_blocked += 1
            return None
        self.conn_window -= len(body)
        self.stream_window[sid] = window - len(body)
        return _frame(DATA, flags, sid, body)

    def flush_blocked(self) -> None:
        queued, self.blocked, out = self.blocked, [], []
        for sid, frame in queued:
            n = len(frame) - 9
            window = self.stream_window.get(sid, self.stream_window_init)
            if self.blocked or n > self.conn_window or n > window:
                self.blocked.append((sid, frame))
                continue
            self.conn_window -= n
            self.stream_window[sid] = window - n
            out.append(frame)
        if out:
            self.transport.write(b"".join(out))

    def beat(self, sim, now: float, out: list) -> None:
        """Queue this rank's (node's) next heartbeat (batch), opening its stream first, or
        resetting it if this is the rank the run kills (dropping the rank from the node's
        batches in node mode)."""
        a, res = self.a, self.res
        sid = self.sid_of.get(sim.rank)
        if self.nodes and sim.kill_at is not None and now >= sim.kill_at:
            sim.drop_killed()
            res.killed_at = now
        elif sim.kill_at is not None and now >= sim.kill_at:
            if sid is not None:   # CANCEL, as the kernel's RST ends a killed process's stream
                out.append(_frame(RST_STREAM, 0, sid, (0x8).to_bytes(4, "big")))
            res.killed_at = now
            sim.next_t = float("inf")
            return
        if sid is None:
            sid, self.next_stream = self.next_stream, self.next_stream + 2
            self.sid_of[sim.rank] = sid
            self.streams[sid] = sim
            out.append(_frame(HEADERS, END_HEADERS, sid, self.headers))
        hb = sim.beat(now, (sim.seq + sim.rank) % a.ack_every == 0)
        in_window = a.win0 <= now < a.win1
        if in_window:
            res.lag_ms.append((now - sim.next_t) * 1e3)
            res.window_heartbeats += len(sim.ranks) if self.nodes else 1
        if hb.ack:
            self.pending[(sid, sim.seq)] = (time.perf_counter(), in_window)
        frame = self.send_data(sid, hb.SerializeToString())
        if frame is not None:
            out.append(frame)
        res.sent += 1
        sim.next_t += INTERVAL_S

    def finish(self) -> None:
        out, self.finishing = [], True
        for sim in self.sims:   # a clean finish: never reported dead
            sid, last = self.sid_of.get(sim.rank), sim.final()
            if sid is None or last is None:
                continue
            self.finishing_streams += 1
            for frame in (self.send_data(sid, last), self.send_data(sid, b"", END_STREAM)):
                if frame is not None:
                    out.append(frame)
        self.transport.write(b"".join(out))


async def _run_h2(conns: list[H2Client], a) -> None:
    """One scheduler for every connection: wake each slot, send what is due, one write per
    connection."""
    due = [(sim.next_t, sim.rank, sim, c) for c in conns for sim in c.sims]
    heapq.heapify(due)
    while due:
        await asyncio.sleep(SLOT_S)
        now = time.time()
        if now >= a.win1 + 1.0:
            break
        batches: dict[H2Client, list] = {}
        while due and due[0][0] <= now:
            _, rank, sim, c = heapq.heappop(due)
            c.beat(sim, now, batches.setdefault(c, []))
            if sim.next_t != float("inf"):
                heapq.heappush(due, (sim.next_t, rank, sim, c))
        for c, out in batches.items():
            if out and not c.transport.is_closing():
                c.transport.write(b"".join(out))
    for c in conns:
        c.finish()
    # Until the daemon has answered every goodbye (phase done): a busy daemon reads slowly,
    # and what is still in our buffers when the process exits would be lost, making
    # finished ranks look dead.
    for _ in range(3000):
        if all(c.ended >= c.finishing_streams for c in conns):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    for c in conns:
        c.transport.close()


async def _generate(a) -> GenResult:
    from suanli.fault.health.auth import call_metadata
    from suanli.fault.health.client import make_channel
    from suanli.fault.proto import health_pb2_grpc as pbg

    global HOST
    HOST = _host()
    a.metadata = call_metadata(None)
    channels = [make_channel(a.addr, aio=True) for _ in range(a.channels)] if a.client == "aio" else []
    stubs = [pbg.HealthStub(c) for c in channels]
    print("ready", flush=True)
    t0 = float(sys.stdin.readline())
    a.win0 = t0 + a.ramp + a.settle
    a.win1 = a.win0 + a.duration
    res = GenResult()
    cpu = []

    async def cpu_mark(at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        cpu.append(time.process_time())

    marks = [asyncio.create_task(cpu_mark(a.win0)), asyncio.create_task(cpu_mark(a.win1))]
    sims = [SimRank(r, a, t0) for r in range(a.first, a.first + a.count)]
    if a.ranks_per_node:
        n = a.ranks_per_node
        sims = [SimNode(sims[i:i + n], a) for i in range(0, len(sims), n)]
    if a.client == "aio":
        await asyncio.gather(*(_rank_stream(stubs[i % len(stubs)], s, a, res) for i, s in enumerate(sims)))
    else:
        host, port = a.addr.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        conns = []
        for i in range(a.channels):
            group = sims[i::a.channels]
            if group:
                _, proto = await loop.create_connection(lambda g=group: H2Client(g, a, res), host, int(port))
                conns.append(proto)
        await _run_h2(conns, a)
    await asyncio.gather(*marks)
    res.cpu_s = cpu[1] - cpu[0]
    for c in channels:
        await c.close()
    return res


async def _bare_server(addr: str) -> None:
    """The control experiment: grpc.aio with the daemon's options, doing nothing with a
    heartbeat but keep it (and ack it when asked). What it cannot hold, no daemon can."""
    import grpc

    from suanli.fault.health.daemon import SERVER_OPTIONS
    from suanli.fault.proto import health_pb2 as pb
    from suanli.fault.proto import health_pb2_grpc as pbg

    last: dict = {}

    class Bare(pbg.HealthServicer):
        async def Report(self, request_iterator, context):
            async for hb in request_iterator:
                last[(hb.job, hb.rank)] = hb
                if hb.ack:
                    yield pb.ReportReply(seq=hb.seq)

        async def Status(self, request, context):
            return pb.StatusReply(members=[pb.MemberStatus(job=h.job, rank=h.rank, step=h.step, state="ok")
                                           for h in list(last.values()) if h.job == request.job])

        async def Watch(self, request, context):
            while request.follow:
                await asyncio.sleep(3600)
            return
            yield  # an (empty) stream

    server = grpc.aio.server(options=SERVER_OPTIONS)
    pbg.add_HealthServicer_to_server(Bare(), server)
    server.add_insecure_port(addr)
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def generator_main(a) -> None:
    res = asyncio.run(_generate(a))
    Path(a.result).write_text(json.dumps(res.__dict__))
