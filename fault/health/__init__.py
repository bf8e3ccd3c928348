"""Heartbeat fault detection: the health daemon (gRPC + SQLite journal + /metrics), its
detectors, the per-rank `HeartbeatReporter`, the node agent (optionally the node's relay,
relay.py) and the read-side client. See daemon.py for the server, detectors.py for the
rules and their defaults."""

from suanli.fault.health.client import HealthClient
from suanli.fault.health.daemon import DaemonConfig, DaemonHandle, serve, start_daemon
from suanli.fault.health.detectors import DetectorConfig
from suanli.fault.health.reporter import HeartbeatReporter

__all__ = ["DaemonConfig", "DaemonHandle", "DetectorConfig", "HealthClient", "HeartbeatReporter", "serve",
           "start_daemon"]
