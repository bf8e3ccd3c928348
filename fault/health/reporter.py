"""`HeartbeatReporter`: the worker side. A background thread keeps one Report stream open to
the health daemon and sends this rank's state every interval; the daemon's replies carry
commands (dump stacks). The training thread only sets attributes (`update`,
`collective_issued`, the trainer hooks), so the cost inside a step is a few microseconds.

    rep = HeartbeatReporter("127.0.0.1:50051", job="demo").attach(trainer)   # trainer hooks
    # or standalone:
    with HeartbeatReporter(addr, job="demo", rank=r) as rep:
        rep.update(step=s, phase="forward", loss=l); rep.collective_issued()

Defaults come from the environment: SUANLI_HEALTH_ADDR, SUANLI_HEALTH_RELAY,
SUANLI_HEALTH_TOKEN_FILE, SUANLI_JOB, RANK, WORLD_SIZE, SUANLI_RUN_DIR. If the daemon goes
away, the reporter reconnects with capped exponential backoff (0.1 s doubling to 1 s,
jittered); training never waits for it.

With a node relay (`relay=` or SUANLI_HEALTH_RELAY, the address of `suanli health agent
--relay-bind`), heartbeats go through it. If the relay cannot be reached or its stream
breaks, the reporter switches to the daemon at once (no backoff), and tries the relay
again every `relay_retry_s` (30 s), so an agent crash costs a rank one missed heartbeat at
most, never a `dead` event. Heartbeats are sent on the wall clock at k x interval + a
phase derived from the node name: the ranks of one node send together (the relay sends
them as one batch) and different nodes spread over the interval.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import random
import socket
import threading
import time
import zlib

import grpc

from suanli.fault.health.auth import call_metadata, read_token
from suanli.fault.health.client import ADDR_ENV, RELAY_ENV, TOKEN_FILE_ENV, make_channel
from suanli.fault.health.hostinfo import device_health, host_metrics
from suanli.fault.health.stacks import dump_stacks
from suanli.fault.health.state import PHASES
from suanli.fault.health.validate import JOB_RE
from suanli.fault.proto import health_pb2 as pb
from suanli.fault.proto import health_pb2_grpc as pbg

log = logging.getLogger("suanli.health.reporter")

# Errors that retrying will not fix: said once, then retried slowly.
_FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
          grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}


class HeartbeatReporter:
    def __init__(self, addr: str | None = None, *, job: str | None = None, rank: int | None = None,
                 world_size: int | None = None, node: str | None = None, run_dir: str | None = None,
                 interval_s: float = 1.0, token: str | None = None, token_file: str | None = None,
                 tls_ca: str | None = None, tls_server_name: str | None = None, health_every: int = 10,
                 max_backoff_s: float = 1.0, accelerator=None, relay: str | None = None,
                 relay_retry_s: float = 30.0) -> None:
        env = os.environ
        self.addr = addr or env.get(ADDR_ENV)
        if not self.addr:
            raise ValueError(f"HeartbeatReporter: no daemon address; pass addr='HOST:PORT' or set {ADDR_ENV}")
        self.relay = relay or env.get(RELAY_ENV) or None
        if relay_retry_s <= 0:
            raise ValueError(f"HeartbeatReporter relay_retry_s={relay_retry_s}: must be positive (30.0 is the default)")
        self.relay_retry_s = relay_retry_s
        if interval_s <= 0:
            raise ValueError(f"HeartbeatReporter interval_s={interval_s}: must be positive (1.0 is the default)")
        self.token = token or read_token(token_file or env.get(TOKEN_FILE_ENV), "token_file")
        self.job = job or env.get("SUANLI_JOB") or "default"
        if not JOB_RE.match(self.job):
            raise ValueError(f"HeartbeatReporter job={self.job!r}: use 1-128 letters, digits, '.', '_' or '-'")
        self.rank = int(rank if rank is not None else env.get("RANK", 0))
        self.world_size = int(world_size if world_size is not None else env.get("WORLD_SIZE", 0))
        self.node = node or socket.gethostname()
        # Same on every rank of the node (crc32, not hash(): that differs per process).
        self.phase_s = (zlib.crc32(self.node.encode()) % 10_007) / 10_007 * interval_s
        self.run_dir = run_dir or env.get("SUANLI_RUN_DIR") or "."
        self.interval_s, self.health_every, self.max_backoff_s = interval_s, max(1, health_every), max_backoff_s
        self.tls_ca, self.tls_server_name, self.accelerator = tls_ca, tls_server_name, accelerator
        # Live values: written by the training thread, read when a heartbeat is built.
        self.step, self.phase = 0, pb.PHASE_IDLE
        self.loss = self.grad_norm = self.mfu = None
        self.step_time_s = self.tokens_per_s = 0.0
        self.collectives = self.nan_count = self.spike_count = 0
        self._step_at = 0.0
        # Reporter-thread state.
        self.connected = False
        self.connects = 0          # streams the daemon acknowledged (1 + reconnects)
        self.via_relay = False     # the current stream goes through the node relay
        self.sent = 0
        self.dumps: list[str] = []
        self._seq = 0
        self._dumped: tuple[int, str] | None = None
        self._call = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._retry_relay = False

    # ---- training-thread API (cheap) ----
    def update(self, step: int | None = None, phase: str | None = None, loss: float | None = None,
               grad_norm: float | None = None, step_time_s: float | None = None, tokens_per_s: float | None = None,
               mfu: float | None = None) -> None:
        if phase is not None:
            p = PHASES.get(phase)
            if p is None:
                raise ValueError(f"HeartbeatReporter.update phase={phase!r}: use one of {', '.join(PHASES)}")
            self.phase = p
        # float()/int(): a 0-d tensor or numpy scalar must not reach the message builder.
        if step is not None:
            step = int(step)
        if step is not None and step != self.step:
            now = time.monotonic()
            if step_time_s is None and self._step_at and step > self.step:
                step_time_s = (now - self._step_at) / (step - self.step)
            self._step_at = now
            self.step = step
        if loss is not None:
            self.loss = float(loss)
            if not math.isfinite(self.loss):
                self.nan_count += 1
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)
        if step_time_s is not None:
            self.step_time_s = float(step_time_s)
        if tokens_per_s is not None:
            self.tokens_per_s = float(tokens_per_s)
        if mfu is not None:
            self.mfu = float(mfu)

    def collective_issued(self, n: int = 1) -> None:
        self.collectives += n

    def flag_divergence(self, kind: str = "spike") -> None:
        """For the NaN/spike guard: the daemon raises a `diverging` event."""
        if kind == "nan":
            self.nan_count += 1
        elif kind == "spike":
            self.spike_count += 1
        else:
            raise ValueError(f"HeartbeatReporter.flag_divergence kind={kind!r}: use 'nan' or 'spike'")

    # ---- trainer integration ----
    def attach(self, trainer, count_collectives: bool = True) -> "HeartbeatReporter":
        """Register on the trainer's hooks (phase, step end, fit end) and start."""
        ctx = getattr(trainer, "ctx", None)
        if ctx is not None:
            self.rank, self.world_size = int(ctx.rank), int(ctx.world_size)
        if getattr(trainer, "run_dir", None) is not None:
            self.run_dir = str(trainer.run_dir)
        trainer.hooks.on_phase.append(self._on_phase)
        trainer.hooks.on_step_end.append(self._on_step_end)
        trainer.hooks.on_fit_end.append(lambda _t: self.stop(done=True))
        if count_collectives:
            count_collectives_for(self)
        return self.start()

    def _on_phase(self, _trainer, name: str) -> None:
        self.phase = PHASES.get(name, pb.PHASE_UNSPECIFIED)

    def _on_step_end(self, _trainer, r) -> None:
        self.update(step=r.step, loss=r.loss, grad_norm=r.grad_norm, step_time_s=r.step_time_s,
                    tokens_per_s=r.tokens_per_s, mfu=r.mfu)

    # ---- lifecycle ----
    def start(self) -> "HeartbeatReporter":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{self.rank}", daemon=True)
            self._thread.start()
            atexit.register(self._at_exit)
        return self

    def stop(self, done: bool = True, timeout_s: float = 5.0) -> None:
        """done=True: tell the daemon this rank finished (never reported dead); False: just
        go quiet (the daemon will call it dead after its timeout)."""
        uncount_collectives_for(self)
        if self._thread is None or self._stop.is_set():
            return
        if done:
            self.phase = pb.PHASE_DONE  # before _stop: the final heartbeat must carry it
        self._stop.set()
        if not done and self._call is not None:
            self._call.cancel()
        self._wake.set()
        # Connected: give the final heartbeat time to arrive. Not: do not hold up the
        # end of training for a daemon that is away.
        self._thread.join(timeout_s if self.connected else min(timeout_s, 1.0))
        if self._thread.is_alive() and self._call is not None:
            self._call.cancel()
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        # An exit without stop() may be a crash: do not claim a clean finish.
        self.stop(done=False, timeout_s=1.0)

    def __enter__(self) -> "HeartbeatReporter":
        return self.start()

    def __exit__(self, exc_type, *_exc) -> None:
        self.stop(done=exc_type is None)

    # ---- reporter thread ----
    def _run(self) -> None:
        channel = make_channel(self.addr, self.tls_ca, self.tls_server_name)
        stub = pbg.HealthStub(channel)
        # The relay is on this node's loopback: plain gRPC, the same token.
        relay_channel = make_channel(self.relay) if self.relay else None
        relay_stub = pbg.HealthStub(relay_channel) if relay_channel else None
        backoff, use_relay = 0.1, relay_stub is not None
        try:
            while not self._stop.is_set():
                self.via_relay = use_relay
                try:
                    # Direct, wait_for_ready: while the daemon is away the call waits for the
                    # channel (which retries every <= 1 s) instead of failing in a loop. Via
                    # the relay, fail at once, so the fallback is immediate.
                    self._call = (relay_stub if use_relay else stub).Report(
                        self._heartbeats(), metadata=call_metadata(self.token), wait_for_ready=not use_relay)
                    for reply in self._call:
                        if not self.connected:
                            self.connected, backoff = True, 0.1
                            self.connects += 1
                        for cmd in reply.commands:
                            self._command(cmd)
                except grpc.RpcError as e:
                    self._note_error(e)
                self.connected = False
                if self._stop.is_set():
                    break
                if relay_stub is not None:
                    # Relay stream over (agent gone): straight to the daemon, no pause.
                    # Direct stream ended by _heartbeats for a relay retry: likewise.
                    use_relay = not use_relay
                    if not use_relay or self._retry_relay:
                        self._retry_relay = False
                        continue
                self._stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(2 * backoff, self.max_backoff_s)
        finally:
            channel.close()
            if relay_channel is not None:
                relay_channel.close()

    def _note_error(self, e: grpc.RpcError) -> None:
        if self._stop.is_set() and e.code() == grpc.StatusCode.CANCELLED:
            return
        msg = f"{e.code().name}: {e.details()}"
        if msg != self._last_error:  # say it once, not every second
            level = logging.ERROR if e.code() in _FATAL else logging.INFO
            where = f"relay {self.relay}" if self.via_relay else self.addr
            log.log(level, "heartbeat stream to %s: %s; retrying%s", where, msg,
                    " via the daemon" if self.via_relay else "")
            self._last_error = msg

    def _heartbeats(self):
        """The request stream (gRPC pulls it from its own thread)."""
        first = True
        # Direct while a relay is configured: end this stream now and then to try the relay.
        retry_at = time.monotonic() + self.relay_retry_s if self.relay and not self.via_relay else float("inf")
        while True:
            stopping = self._stop.is_set()
            yield self._build(ack=first)
            first = False
            if stopping:
                return  # the final heartbeat (phase done) went out; half-close
            self._wake.wait(self._until_next_beat())
            self._wake.clear()
            if time.monotonic() >= retry_at and not self._stop.is_set():
                self._retry_relay = True
                return

    def _until_next_beat(self) -> float:
        """Seconds to the next k x interval + phase on the wall clock, at least a quarter
        interval away (a timer that fires a little early must not send twice; at most
        1.25 intervals after an off-grid heartbeat such as the first)."""
        now, iv = time.time(), self.interval_s
        nxt = (math.floor((now + iv / 4 - self.phase_s) / iv) + 1) * iv + self.phase_s
        return nxt - now

    def _build(self, ack: bool) -> pb.Heartbeat:
        self._seq += 1
        hb = pb.Heartbeat(job=self.job, rank=self.rank, world_size=self.world_size, node=self.node, pid=os.getpid(),
                          step=max(0, int(self.step)), phase=self.phase, step_time_s=_seconds(self.step_time_s),
                          tokens_per_s=_seconds(self.tokens_per_s, 1e15), collectives=self.collectives,
                          nan_count=self.nan_count, spike_count=self.spike_count, run_dir=self.run_dir,
                          seq=self._seq, sent_unix=time.time(), ack=ack)
        if self.loss is not None:
            hb.loss = self.loss
        if self.grad_norm is not None:
            hb.grad_norm = self.grad_norm
        if self.mfu is not None and 0.0 <= self.mfu <= 100.0:
            hb.mfu = self.mfu
        if ack or self._seq % self.health_every == 0:
            hb.host.CopyFrom(host_metrics(self.run_dir if os.path.isdir(self.run_dir) else "/"))
            hb.devices.extend(device_health(self.accelerator))
        if self._dumped is not None:
            hb.dumped_id, hb.dump_path = self._dumped
        self.sent += 1
        return hb

    def _command(self, cmd: pb.Command) -> None:
        if cmd.kind == pb.COMMAND_DUMP_STACKS:
            try:
                path = str(dump_stacks(self.run_dir, self.rank, cmd.reason))
            except OSError as e:
                path = f"(dump failed: {e})"
            self.dumps.append(path)
            self._dumped = (cmd.id, path)
            self._wake.set()  # tell the daemon where the stacks are now, not next interval


def _seconds(v: float, hi: float = 1e7) -> float:
    return v if math.isfinite(v) and 0.0 <= v <= hi else 0.0


# ---- counting collectives ----
# Wraps torch.distributed's Python collectives so each call bumps the counters of the
# reporters that asked. Collectives issued from C++ (DDP's reducer) are not seen; the step
# counter still covers them.
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "all_to_all",
                "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
                "batch_isend_irecv", "monitored_barrier")
_counting: list[HeartbeatReporter] = []
_originals: dict[str, object] = {}


def count_collectives_for(reporter: HeartbeatReporter) -> None:
    import torch.distributed as dist

    if reporter not in _counting:
        _counting.append(reporter)
    if _originals:
        return
    for name in _COLLECTIVES:
        orig = getattr(dist, name, None)
        if orig is None:
            continue
        _originals[name] = orig

        @functools.wraps(orig)
        def counted(*args, __orig=orig, **kwargs):
            for r in _counting:
                r.collectives += 1
            return __orig(*args, **kwargs)

        setattr(dist, name, counted)


def uncount_collectives_for(reporter: HeartbeatReporter) -> None:
    if reporter in _counting:
        _counting.remove(reporter)
    if not _counting and _originals:
        import torch.distributed as dist

        for name, orig in _originals.items():
            setattr(dist, name, orig)
        _originals.clear()
