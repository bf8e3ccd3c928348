"""Prometheus `/metrics` for the daemon.

Values are read from the engine's in-memory state when Prometheus scrapes (a custom
collector), so heartbeats never pay for metric updates. The per-rank families are written
as text directly: through prometheus_client, 10,000 ranks cost ~0.7 s of CPU per scrape,
time the GIL takes from heartbeat handling; formatted here, ~0.08 s. Served by a small
HTTP server that asks for the daemon's bearer token when one is set (Prometheus:
`authorization: credentials_file`).
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from suanli.fault.health.auth import bearer_ok, check_bind
from suanli.fault.health.engine import DELAY_BUCKETS
from suanli.fault.health.state import CONDITIONS, EVENT_KINDS

# (name, help, value of a member, or None when it has none)
PER_RANK = (
    ("suanli_health_heartbeat_age_seconds", "Seconds since the rank's last heartbeat",
     lambda m, now: max(0.0, now - m.last_seen)),
    ("suanli_health_step", "Last reported optimizer step", lambda m, now: max(m.step, 0)),
    ("suanli_health_step_time_seconds", "Last reported step time", lambda m, now: m.hb.step_time_s),
    ("suanli_health_tokens_per_second", "Last reported tokens/s", lambda m, now: m.hb.tokens_per_s),
    ("suanli_health_mfu", "Last reported MFU (absent when the peak is unknown)",
     lambda m, now: m.hb.mfu if m.hb.HasField("mfu") else None),
)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def per_rank_text(engine) -> bytes:
    """The per-rank gauges in the Prometheus text format (labels sorted, as
    prometheus_client writes them)."""
    now = engine.clock()
    ranks = [(m, f'{{job="{_label(m.job)}",node="{_label(m.node)}",rank="{m.rank}"}} ')
             for m in list(engine.members.values()) if m.rank >= 0 and m.hb is not None]
    out = []
    for name, help_text, value in PER_RANK:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
        for m, labels in ranks:
            v = value(m, now)
            if v is not None:
                out.append(f"{name}{labels}{float(v)!r}\n")
    return "".join(out).encode()


class HealthCollector:
    def __init__(self, engine, store=None) -> None:
        self.engine, self.store = engine, store

    def collect(self):
        e = self.engine
        states = GaugeMetricFamily("suanli_health_members", "Members (ranks and node agents) by state", labels=["state"])
        counts = dict.fromkeys(("ok", "done", *CONDITIONS), 0)
        for m in list(e.members.values()):
            counts[m.state] = counts.get(m.state, 0) + 1
        for state, n in counts.items():
            states.add_metric([state], n)
        yield states
        events = CounterMetricFamily("suanli_health_events", "Events emitted, by kind", labels=["kind"])
        for kind in EVENT_KINDS:
            events.add_metric([kind], e.event_counts.get(kind, 0))
        yield events
        yield CounterMetricFamily("suanli_health_reports", "Heartbeats received", value=e.reports)
        yield GaugeMetricFamily("suanli_health_daemon_lag_seconds",
                                "How late heartbeats are being applied (extends the dead timeout)", value=e.lag_s)
        # Sender's clock to applied here: exact on one host, as good as NTP/PTP across hosts.
        cumulative, buckets = 0, []
        for le, n in zip((*DELAY_BUCKETS, float("inf")), e.delay_counts):
            cumulative += n
            buckets.append(("+Inf" if le == float("inf") else repr(le), cumulative))
        yield HistogramMetricFamily("suanli_health_report_delay_seconds",
                                    "Heartbeat sent -> applied by the daemon (uses the sender's clock)",
                                    buckets=buckets, sum_value=e.delay_sum)
        if self.store is not None:
            yield GaugeMetricFamily("suanli_health_journal_error", "1 when the last SQLite write failed",
                                    value=1 if self.store.error else 0)


class MetricsServer:
    """`/metrics` on its own thread; `address` is the bound host:port."""

    def __init__(self, bind: str, registry: CollectorRegistry, token: str | None, engine=None) -> None:
        host, port = check_bind(bind, token, "--metrics-bind")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] != "/metrics":
                    self._send(404, b"not found: try /metrics\n", "text/plain")
                elif token is not None and not bearer_ok(self.headers.get("Authorization"), token):
                    self._send(401, b"missing or wrong token: send 'Authorization: Bearer <token>'\n", "text/plain")
                else:
                    extra = per_rank_text(engine) if engine is not None else b""
                    self._send(200, extra + generate_latest(registry), CONTENT_TYPE_LATEST)

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not news
                pass

        server_cls = _HTTPServer6 if ":" in host else ThreadingHTTPServer
        self.httpd = server_cls((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _HTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_registry(engine, store=None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HealthCollector(engine, store))
    return registry
