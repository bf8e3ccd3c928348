"""The cluster health daemon: the Health service plus gRPC reflection and the standard
grpc.health.v1 service on one grpc.aio server, the token check, the detector and journal
timers, and Prometheus /metrics.

    handle = start_daemon("127.0.0.1:0", "runs/health.db")   # background thread (supervisors, tests)
    handle.address, handle.metrics_address; handle.stop()
    serve(DaemonConfig(...))                                  # foreground (`suanli health serve`)

Everything that touches member state runs on the daemon's event loop, the detector sweep
and the journal snapshots included (those a slice at a time, heartbeats handled in
between): on worker threads they would take the GIL from the loop for far longer than
their work takes whenever the host is busy. Only Status and the SQLite writes use threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field

import grpc

from suanli.fault.health.auth import TokenInterceptor, check_bind, server_credentials
from suanli.fault.health.detectors import DetectorConfig
from suanli.fault.health.engine import Engine
from suanli.fault.health.service import HealthService, add_to_server
from suanli.fault.health.store import Store
from suanli.fault.proto import health_pb2 as pb

log = logging.getLogger("suanli.health")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Health"].full_name
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),   # a second daemon on a busy port must fail, not share it
    ("grpc.max_concurrent_streams", 1 << 20),
    # Thousands of ranks (re)connecting at once exceed gRPC's default pending-call limit,
    # and the excess would be cancelled.
    ("grpc.server.max_pending_requests", 1 << 20),
    ("grpc.server.max_pending_requests_hard_limit", 1 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


SWITCH_INTERVAL_S = 0.0005
JOURNAL_SLICE = 250   # member rows built per turn of the event loop (~2 ms)


@dataclass
class DaemonConfig:
    bind: str = "127.0.0.1:50051"
    db: str = "health.db"
    metrics_bind: str | None = None
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 64 * 1024      # a heartbeat is well under 4 KiB
    max_members: int = 200_000
    # Member snapshots (events are journaled at once). Ranks resend their state on
    # reconnecting, so a snapshot a few seconds old loses nothing that matters; 10,000
    # ranks cost ~10% of a core per snapshot-per-second.
    journal_interval_s: float = 2.0
    detectors: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={self.max_message_bytes}: must be at least 1024")
        if self.max_members < 1:
            raise ValueError(f"max_members={self.max_members}: must be at least 1")
        if self.journal_interval_s <= 0:
            raise ValueError(f"journal_interval_s={self.journal_interval_s}: must be positive")


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.address = self.metrics_address = None
        self.metrics = None
        self.freeze_gc = False   # serve() sets it: the process is the daemon's alone
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        try:  # the `health` extra: only the daemon needs these
            from grpc_health.v1 import health as grpc_health
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            from grpc_reflection.v1alpha import reflection

            from suanli.fault.health.metrics import MetricsServer, make_registry
        except ImportError as e:
            raise RuntimeError(f"the health daemon needs {e.name}: pip install 'suanli[health]'") from None
        cfg = self.cfg
        host, _ = check_bind(cfg.bind, cfg.token)
        if cfg.metrics_bind:
            check_bind(cfg.metrics_bind, cfg.token, "--metrics-bind")
        creds = server_credentials(cfg.tls_cert, cfg.tls_key)
        self.store = Store(cfg.db)
        self.engine = Engine(cfg.detectors, self.store, cfg.max_members)
        self.server = grpc.aio.server(
            interceptors=[TokenInterceptor(cfg.token)] if cfg.token else [],
            options=SERVER_OPTIONS + [("grpc.max_receive_message_length", cfg.max_message_bytes)])
        add_to_server(HealthService(self.engine), self.server)
        self.health = grpc_health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([SERVICE_NAME, health_name, reflection.SERVICE_NAME], self.server)
        try:
            port = self.server.add_secure_port(cfg.bind, creds) if creds else self.server.add_insecure_port(cfg.bind)
        except RuntimeError:
            port = 0
        if not port:
            self.store.close()
            raise ValueError(f"--bind {cfg.bind}: cannot listen there (port in use or address not local); pick another")
        await self.server.start()
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_bind:
            try:
                self.metrics = MetricsServer(cfg.metrics_bind, make_registry(self.engine, self.store), cfg.token,
                                             self.engine)
            except OSError as e:
                await self.server.stop(None)
                self.store.close()
                raise ValueError(f"--metrics-bind {cfg.metrics_bind}: cannot listen there ({e.strerror}); "
                                 f"pick another port") from None
            self.metrics_address = self.metrics.address
        self._tasks = [asyncio.create_task(self._detect()), asyncio.create_task(self._journal())]

    async def _detect(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.detectors.tick_s)
            try:
                # On the loop: ~10 ms for 10,000 ranks. On a worker thread it took the GIL
                # from the loop for 100-400 ms at a time on a busy 2-core host (measured).
                self.engine.tick()
            except Exception:  # a detector bug must not take the daemon down
                log.exception("health detector sweep failed")

    async def _journal(self) -> None:
        frozen = 0
        while True:
            await asyncio.sleep(self.cfg.journal_interval_s / 2)
            try:
                dirty = self.engine.dirty_members()
                # On the loop, a slice at a time, the slices spread over half an interval:
                # built on a thread, 10,000 rows held the GIL against the loop for up to a
                # second on a busy host; in one burst on the loop, heartbeats in flight
                # waited behind every slice (both measured).
                slices = range(0, len(dirty), JOURNAL_SLICE)
                gap = self.cfg.journal_interval_s / 2 / max(1, len(slices))
                for i in slices:
                    members = self.engine.members   # (one forgotten meanwhile stays forgotten)
                    part = [m for m in dirty[i:i + JOURNAL_SLICE] if members.get(m.id) is m]
                    self.store.put_members(self.engine.rows(part))
                    await asyncio.sleep(gap)
                # Members live as long as their ranks: out of the collector's sight, or every
                # full collection walks 10,000 of them and stalls the loop (~0.2 s, measured).
                if self.freeze_gc and len(self.engine.members) > 1.1 * frozen:
                    frozen = len(self.engine.members)
                    gc.freeze()
            except Exception:
                log.exception("health journal snapshot failed")

    async def stop(self, grace: float = 1.0) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.metrics is not None:
            self.metrics.stop()
        self.store.put_members(self.engine.rows(list(self.engine.members.values())))
        self.store.close()


class DaemonHandle:
    """A daemon running on its own event loop in a background thread."""

    def __init__(self, daemon: Daemon, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.daemon, self._loop, self._thread = daemon, loop, thread
        self.address: str = daemon.address
        self.metrics_address: str | None = daemon.metrics_address
        self.engine: Engine = daemon.engine

    def subscribe(self, callback) -> None:
        """Call callback(event: health_pb2.Event) for every new event, on the daemon's thread
        (keep it short; hand work to your own thread)."""
        self._loop.call_soon_threadsafe(self.engine.listeners.append, callback)

    def status(self) -> pb.StatusReply:
        return asyncio.run_coroutine_threadsafe(_call(self.engine.status), self._loop).result(30)

    def stop(self, grace: float = 1.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.daemon.stop(grace), self._loop).result(60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def __enter__(self) -> "DaemonHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _call(fn, *args):
    return fn(*args)


def start_daemon(bind: str = "127.0.0.1:0", db: str = "health.db", token: str | None = None, *,
                 metrics_bind: str | None = None, detectors: DetectorConfig | None = None, **options) -> DaemonHandle:
    """Start a daemon in a background thread; returns once it is serving."""
    cfg = DaemonConfig(bind=bind, db=db, token=token, metrics_bind=metrics_bind,
                       detectors=detectors or DetectorConfig(), **options)
    daemon = Daemon(cfg)
    started: concurrent.futures.Future = concurrent.futures.Future()
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(daemon.start())
        except BaseException as e:
            started.set_exception(e)
            loop.close()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="health-daemon", daemon=True)
    thread.start()
    started.result(60)
    return DaemonHandle(daemon, loop, thread)


def serve(cfg: DaemonConfig) -> int:
    """Run in the foreground until SIGINT/SIGTERM."""

    async def main() -> None:
        daemon = Daemon(cfg)
        daemon.freeze_gc = True
        await daemon.start()
        # Everything imported so far (torch comes with the suanli package) lives as long as
        # the process: move it out of the collector's sight, or each full collection walks
        # it and stalls heartbeat handling for a long moment.
        gc.collect()
        gc.freeze()
        # /metrics and Status build their answers on threads; with the default 5 ms GIL
        # switch interval, each time the event loop gives the GIL up meanwhile (every
        # socket read) it waits up to 5 ms to get it back, and heartbeats queue behind that
        # (the "convoy effect", https://bugs.python.org/issue7946).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        extra = f", metrics on http://{daemon.metrics_address}/metrics" if daemon.metrics_address else ""
        print(f"suanli health: serving on {daemon.address}{extra}; journal {cfg.db}", flush=True)
        await stop.wait()
        await daemon.stop()
        print("suanli health: stopped", file=sys.stderr, flush=True)

    asyncio.run(main())
    return 0
