"""The node relay (`suanli health agent --relay-bind HOST:PORT`): serves the Health Report RPC
to the ranks of its node and forwards their heartbeats to the daemon on ONE ReportBatch
stream, so the daemon handles one gRPC stream and ~1 message a second per node instead of
per rank (at 10,000 ranks one message per rank per second is more than grpc Python can
take on a small host; see bench/results/health-load-relay.md).

- Heartbeats that arrive within `window_s` (5 ms) of the first pending one go out as one
  batch, at once when every local rank is in; reporters align their schedule to the wall
  clock with a per-node phase, so a node's ranks arrive together. Nothing waits longer
  than the window.
- Each heartbeat is checked here exactly as the daemon checks it, so a bad rank gets its
  own INVALID_ARGUMENT and the node's stream stays up; the daemon checks again anyway.
- Replies (acks, DUMP_STACKS commands) come back per (job, rank) and are routed to that
  rank's local stream.
- A rank whose local stream ends is no longer forwarded: the daemon sees it dead by
  silence, as with a direct stream. If the daemon goes away the relay reconnects with
  backoff, dropping batches older than one interval (heartbeats are snapshots: the next
  one says everything the dropped one did).
- The node's own heartbeat (host and device health) rides in the batches.

A relay that dies ends its ranks' streams and they report to the daemon directly within a
heartbeat (reporter.py). A relay that hangs without dying (SIGSTOP, a stuck host) is not
detected by the reporters: its ranks go quiet and are reported dead after the timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import socket
import threading
import time

import grpc

from suanli.fault.health.auth import TokenInterceptor, call_metadata, check_bind
from suanli.fault.health.client import make_channel
from suanli.fault.health.hostinfo import device_health, host_metrics
from suanli.fault.health.service import BAD, Malformed, add_to_server
from suanli.fault.health.validate import MAX_BATCH, check_heartbeat
from suanli.fault.proto import health_pb2 as pb
from suanli.fault.proto import health_pb2_grpc as pbg

log = logging.getLogger("suanli.health.relay")

MAX_BATCH_BYTES = 48 * 1024   # under the daemon's default 64 KiB message limit
LOCAL_MAX_MESSAGE = 64 * 1024
MAX_QUEUED = 64               # batches held while the daemon is away; older ones are dropped


class RelayService(pbg.HealthServicer):
    """Report for the local ranks; every other method answers UNIMPLEMENTED (ask the daemon)."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay

    async def Report(self, request_iterator, context):
        relay, key = self.relay, None
        replies: asyncio.Queue = asyncio.Queue()
        writer = asyncio.create_task(_send_replies(replies, context))
        try:
            async for hb in request_iterator:
                err = hb.message if type(hb) is Malformed else check_heartbeat(hb)
                if err:
                    await context.abort(BAD, err)
                if (hb.job, hb.rank) != key:
                    relay.routes.pop(key, None)
                    key = (hb.job, hb.rank)
                    relay.routes[key] = replies
                relay.submit(hb)
        finally:
            writer.cancel()
            if key is not None and relay.routes.get(key) is replies:
                del relay.routes[key]


async def _send_replies(replies: asyncio.Queue, context) -> None:
    while True:
        await context.write(await replies.get())


class Relay:
    def __init__(self, upstream: str, bind: str, *, node: str | None = None, token: str | None = None,
                 tls_ca: str | None = None, interval_s: float = 1.0, window_s: float = 0.005) -> None:
        if interval_s <= 0:
            raise ValueError(f"--interval {interval_s}: must be positive (the daemon's heartbeat interval, 1 s)")
        if not 0 < window_s <= 0.1:
            raise ValueError(f"--relay-window {window_s}: must be within (0, 0.1] s; a few ms coalesce a node's ranks")
        self.host, _ = check_bind(bind, token, "--relay-bind")
        self.upstream, self.bind, self.token, self.tls_ca = upstream, bind, token, tls_ca
        self.node = node or socket.gethostname()
        self.interval_s, self.window_s = interval_s, window_s
        self.routes: dict[tuple[str, int], asyncio.Queue] = {}
        self.address: str | None = None
        self.forwarded = self.batches = 0
        self._pending: list[pb.Heartbeat] = []
        self._pending_bytes = 0
        self._pending_ranks: set[tuple[str, int]] = set()
        self._node_hb: pb.NodeHeartbeat | None = None
        self._flush_at: asyncio.TimerHandle | None = None
        self._out: collections.deque[pb.HeartbeatBatch] = collections.deque()
        self._out_ready = asyncio.Event()
        self._seq = 0
        self._tasks: list[asyncio.Task] = []

    # ---- coalescing ----
    def submit(self, hb: pb.Heartbeat) -> None:
        self._pending.append(hb)
        self._pending_ranks.add((hb.job, hb.rank))
        self._pending_bytes += hb.ByteSize()
        # Every local rank is in (the usual case, their schedules being aligned): waiting
        # out the window would only add latency.
        if (len(self._pending_ranks) >= len(self.routes) or self._pending_bytes >= MAX_BATCH_BYTES
                or len(self._pending) >= MAX_BATCH):
            self.flush()
        elif self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(self.window_s, self.flush)

    def submit_node(self, nhb: pb.NodeHeartbeat) -> None:
        """The node's heartbeat rides with the next batch of rank heartbeats (within an
        interval); with no local ranks, or when leaving, it goes on its own."""
        self._node_hb = nhb
        if (not self.routes or nhb.leaving) and self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(self.window_s, self.flush)

    def flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if not self._pending and self._node_hb is None:
            return
        self._seq += 1
        batch = pb.HeartbeatBatch(seq=self._seq, sent_unix=time.time(), heartbeats=self._pending)
        if self._node_hb is not None:
            batch.node.CopyFrom(self._node_hb)
        self.forwarded += len(self._pending)
        self._pending, self._pending_bytes, self._node_hb = [], 0, None
        self._pending_ranks = set()
        self._out.append(batch)
        while len(self._out) > MAX_QUEUED:
            self._out.popleft()
        self._out_ready.set()

    # ---- upstream ----
    async def _upstream(self) -> None:
        channel = make_channel(self.upstream, self.tls_ca, aio=True)
        stub = pbg.HealthStub(channel)
        backoff, last_error = 0.1, None
        try:
            while True:
                call = stub.ReportBatch(metadata=call_metadata(self.token), wait_for_ready=True)
                reader = asyncio.create_task(self._route_replies(call))
                try:
                    while not reader.done():
                        await self._out_ready.wait()
                        self._out_ready.clear()
                        while self._out:
                            batch = self._out.popleft()
                            if time.time() - batch.sent_unix > self.interval_s:
                                continue   # stale while we were away: a newer one follows
                            await call.write(batch)
                            self.batches += 1
                            backoff, last_error = 0.1, None
                    await reader
                except Exception as e:  # the stream broke (daemon restarting, network): reconnect
                    msg = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else repr(e)
                    if msg != last_error:
                        log.warning("relay -> daemon %s: %s; reconnecting", self.upstream, msg)
                        last_error = msg
                finally:
                    reader.cancel()
                    call.cancel()
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(2 * backoff, 1.0)
        finally:
            await channel.close()

    async def _route_replies(self, call) -> None:
        try:
            async for reply in call:
                for r in reply.replies:
                    q = self.routes.get((r.job, r.rank))
                    if q is not None:
                        r.ClearField("job")
                        r.ClearField("rank")
                        q.put_nowait(r)
        finally:
            self._out_ready.set()   # wake the writer so it notices the stream is gone

    # ---- the node's own heartbeat ----
    async def _node_beats(self, disk_path: str, accelerator, stop: asyncio.Event) -> None:
        loop, seq = asyncio.get_running_loop(), 0
        while True:
            seq += 1
            devices, host = await loop.run_in_executor(
                None, lambda: (device_health(accelerator), host_metrics(disk_path)))
            leaving = stop.is_set()
            self.submit_node(pb.NodeHeartbeat(node=self.node, pid=os.getpid(), devices=devices, host=host, seq=seq,
                                              sent_unix=time.time(), leaving=leaving))
            if leaving:
                return
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass

    # ---- lifecycle ----
    async def start(self, disk_path: str = "/", accelerator=None, stop: asyncio.Event | None = None) -> None:
        self.server = grpc.aio.server(
            interceptors=[TokenInterceptor(self.token)] if self.token else [],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", LOCAL_MAX_MESSAGE)])
        add_to_server(RelayService(self), self.server)
        try:
            port = self.server.add_insecure_port(self.bind)
        except RuntimeError:
            port = 0
        if not port:
            raise ValueError(f"--relay-bind {self.bind}: cannot listen there (port in use?); pick another")
        await self.server.start()
        self.address = f"{self.host}:{port}"
        self._stop = stop or asyncio.Event()
        self._tasks = [asyncio.create_task(self._upstream()),
                       asyncio.create_task(self._node_beats(disk_path, accelerator, self._stop))]

    async def stop(self) -> None:
        """Say goodbye for the node (a `leaving` node heartbeat), then close."""
        self._stop.set()
        await asyncio.wait({self._tasks[1]}, timeout=5)
        self.flush()
        deadline = time.monotonic() + 2.0
        while self._out and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.server.stop(0.5)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def run_relay(addr: str, relay_bind: str, node: str | None = None, interval_s: float = 1.0, token: str | None = None,
              tls_ca: str | None = None, disk_path: str = "/", window_s: float = 0.005, accelerator=None,
              stop: threading.Event | None = None, on_ready=None) -> int:
    """Run the relay until `stop` is set (or SIGINT/SIGTERM via run_agent_foreground)."""
    relay = Relay(addr, relay_bind, node=node, token=token, tls_ca=tls_ca, interval_s=interval_s, window_s=window_s)
    stop = stop or threading.Event()

    async def main() -> None:
        await relay.start(disk_path, accelerator)
        if on_ready is not None:
            on_ready(relay)
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await relay.stop()

    asyncio.run(main())
    return 0
