"""The per-node agent (`suanli health agent`): reports the node's host metrics (psutil) and
device health (the HAL) to the daemon every interval, so a node whose ranks are all gone
still says whether it is too hot, out of memory or out of disk. Stops cleanly (a final
`leaving` heartbeat) on SIGINT/SIGTERM or when `stop` is set. With `--relay-bind` it is
also the node's relay (relay.py): its ranks report to it and it forwards them upstream in
batches, its own heartbeat riding along."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import grpc

from suanli.fault.health.auth import call_metadata
from suanli.fault.health.client import make_channel
from suanli.fault.health.hostinfo import device_health, host_metrics
from suanli.fault.proto import health_pb2 as pb
from suanli.fault.proto import health_pb2_grpc as pbg

log = logging.getLogger("suanli.health.agent")


def run_agent(addr: str, node: str | None = None, interval_s: float = 1.0, token: str | None = None,
              tls_ca: str | None = None, disk_path: str = "/", stop: threading.Event | None = None,
              accelerator=None, max_beats: int = 0) -> int:
    if interval_s <= 0:
        raise ValueError(f"--interval {interval_s}: must be positive (the daemon's heartbeat interval, 1 s by default)")
    node = node or socket.gethostname()
    stop = stop or threading.Event()
    channel = make_channel(addr, tls_ca)
    stub = pbg.HealthStub(channel)
    metadata = call_metadata(token)
    seq, last_error = 0, None
    try:
        while True:
            leaving = stop.is_set() or (max_beats and seq >= max_beats - 1)
            seq += 1
            nhb = pb.NodeHeartbeat(node=node, pid=os.getpid(), devices=device_health(accelerator),
                                   host=host_metrics(disk_path), seq=seq, sent_unix=time.time(), leaving=bool(leaving))
            try:
                stub.ReportNode(nhb, timeout=max(1.0, interval_s), metadata=metadata)
                last_error = None
            except grpc.RpcError as e:
                msg = f"{e.code().name}: {e.details()}"
                if msg != last_error:
                    log.warning("node agent -> %s: %s; retrying", addr, msg)
                    last_error = msg
            if leaving:
                return 0
            stop.wait(interval_s)
    finally:
        channel.close()


def run_agent_foreground(relay_bind: str | None = None, relay_window: float = 0.005, **kwargs) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = kwargs.get("node") or socket.gethostname()
    if relay_bind:
        from suanli.fault.health.relay import run_relay

        ready = lambda r: print(f"suanli health agent: node {node} relaying ranks from {r.address} to "
                                f"{kwargs['addr']}", flush=True)
        return run_relay(relay_bind=relay_bind, window_s=relay_window, stop=stop, on_ready=ready, **kwargs)
    print(f"suanli health agent: reporting node {node} to {kwargs['addr']}", flush=True)
    return run_agent(stop=stop, **kwargs)
