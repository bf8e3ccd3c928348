"""Load benchmark for the health daemon: simulated ranks at 1 Hz against one daemon.

    python -m suanli.bench.health_load --ranks 10000 --duration 60
    python -m suanli.bench.health_load --sweep 1000,2000,5000,10000 --out bench/results/health-load.md
    python -m suanli.bench.health_load --server bare --sweep 2000,5000,10000 --out bench/results/health-load-control.md
    python -m suanli.bench.health_load --ranks-per-node 8 --sweep 2000,5000,10000 --out bench/results/health-load-relay.md

One daemon process (`suanli health serve` with its defaults: 1 s interval, 3 s dead
timeout, sweeps every 0.5 s, member snapshots every 2 s) and load-generator processes, each
running many simulated ranks. A simulated rank behaves like a real reporter: its own
Report stream, one heartbeat a second whose step and collective counter advance, step time,
tokens/s, host metrics every 10th heartbeat. Ranks start spread over the ramp (30 s); the
measurement window starts 10 s after it.

Load generator: each simulated rank has its own HTTP/2 stream on one of `--channels`
connections, as a real reporter has its own Report call, sent by a small HTTP/2 gRPC client
written for this benchmark (`--client h2`, so that the generator does not cost more CPU than
the daemon) or by grpc.aio (`--client aio`, a cross-check). The generator side (simulated
ranks and nodes, the client, the control server) is in bench/health_loadgen.py, whose
docstring describes it.

Node mode (`--ranks-per-node N`): what the daemon sees when every node runs the relay
(`suanli health agent --relay-bind`): one ReportBatch stream per simulated node, one
HeartbeatBatch a second holding its N ranks' heartbeats and its node heartbeat, at the
node's phase. Latency = batch write -> ack (every `--ack-every`-th batch of a node asks for
an ack). The killed rank is dropped from its node's batches, as the relay drops a rank
whose stream ended. The relay hop itself (real agent, real reporters) is measured by
bench/health_relay_hop.py.

Control (`--server bare`): the same load against a grpc.aio server with the daemon's
options that only stores each heartbeat. It separates what gRPC in Python costs from what
the daemon adds.

What is measured:
- report latency: every `--ack-every`-th heartbeat of each rank asks the daemon for an ack
  (a uniform sample); latency = write -> ack, as the rank sees it, daemon queueing included.
  This is the number judged against the target. Also shown: the daemon's own histogram of
  heartbeat sent -> applied (every heartbeat, `suanli_health_report_delay_seconds`), as the
  bound of the bucket holding its p99.
- false events: every event except the killed rank's `dead`, over the whole run.
- detection: in the middle of the window one rank stops and drops its stream abruptly;
  detection = time of its dead event - time of the kill (same host clock).
- generator lag: how late heartbeats left against their schedule, so an overloaded generator
  is reported as such instead of being blamed on the daemon.
- CPU and memory of the daemon and the generators (psutil).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from suanli.bench.health_loadgen import GenResult, _bare_server, generator_main

TARGET_P99_MS = 50.0
DEAD_TIMEOUT_S = 3.0          # the daemon's default: 3 x 1 s interval


# ---------------------------------------------------------------- orchestration
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list, q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def _scrape(metrics_addr: str) -> tuple[float, dict[float, float]]:
    """(heartbeats received, the report-delay histogram's cumulative buckets)."""
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=30).read().decode()
    reports, buckets = 0.0, {}
    for line in text.splitlines():
        if line.startswith("suanli_health_reports_total"):
            reports = float(line.split()[-1])
        elif line.startswith("suanli_health_report_delay_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[float(le)] = float(line.split()[-1])
    return reports, buckets


def _p99_bound_ms(b0: dict, b1: dict) -> float | None:
    """Upper bound of the bucket holding the 99th percentile of the window's delays."""
    delta = {le: b1[le] - b0.get(le, 0.0) for le in sorted(b1)}
    total = delta.get(float("inf"), 0.0)
    if not total:
        return None
    return next(le * 1e3 for le, n in delta.items() if n >= 0.99 * total)


def run_once(ranks: int, a) -> dict:
    import psutil

    from suanli.fault.health.client import HealthClient, event_dict

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUANLI_ACCELERATOR": os.environ.get("SUANLI_ACCELERATOR", "cpu")}
    tmp = Path(tempfile.mkdtemp(prefix="health-load-"))
    port, mport = _free_port(), _free_port()
    addr, maddr = f"127.0.0.1:{port}", f"127.0.0.1:{mport}"
    bare = a.server == "bare"
    cmd = ([sys.executable, "-m", "suanli.bench.health_load", "--bare-server", addr] if bare else
           [sys.executable, "-m", "suanli.cli", "health", "serve", "--bind", addr, "--metrics-bind", maddr,
            "--db", str(tmp / "health.db"), *a.daemon_arg])
    daemon = subprocess.Popen(cmd, env=env, stdout=open(tmp / "daemon.log", "w"), stderr=subprocess.STDOUT)
    gens: list[subprocess.Popen] = []
    client = HealthClient(addr, timeout_s=60)
    try:
        deadline = time.time() + 120
        while True:
            try:
                client.status("none")
                break
            except RuntimeError:
                if time.time() > deadline or daemon.poll() is not None:
                    raise RuntimeError(f"daemon did not start; see {tmp / 'daemon.log'}")
                time.sleep(0.2)
        per = -(-ranks // a.clients)
        if a.ranks_per_node:   # a node's ranks stay in one generator
            per = -(-per // a.ranks_per_node) * a.ranks_per_node
        kill_rank = ranks // 2
        for g in range(a.clients):
            first, count = g * per, min(per, ranks - g * per)
            gens.append(subprocess.Popen(
                [sys.executable, "-m", "suanli.bench.health_load", "--generator", "--addr", addr, "--job", "load",
                 "--first", str(first), "--count", str(count), "--total", str(ranks), "--channels", str(a.channels),
                 "--ack-every", str(a.ack_every), "--ramp", str(a.ramp), "--settle", str(a.settle),
                 "--duration", str(a.duration), "--kill-rank", str(kill_rank), "--client", a.client,
                 "--ranks-per-node", str(a.ranks_per_node),
                 "--result", str(tmp / f"gen{g}.json")],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for g in gens:
            if g.stdout.readline().strip() != "ready":
                raise RuntimeError("a load generator failed to start")
        t0 = time.time() + 1.0
        for g in gens:
            g.stdin.write(f"{t0}\n")
            g.stdin.flush()
        events: list[dict] = []

        def watch() -> None:
            try:
                for e in client.events(follow=True):
                    events.append(event_dict(e))
            except Exception:  # the channel closes at the end of the run
                pass

        threading.Thread(target=watch, daemon=True).start()
        win0 = t0 + a.ramp + a.settle
        time.sleep(max(0.0, win0 - time.time()))
        dproc = psutil.Process(daemon.pid)
        d_cpu0, (reports0, delay0), w0 = sum(dproc.cpu_times()[:2]), _scrape(maddr) if not bare else (0, {}), time.time()
        load0 = os.getloadavg()[0]
        connected = sum(1 for m in client.status("load").members)
        time.sleep(max(0.0, win0 + a.duration - time.time()))
        d_cpu1, (reports1, delay1), w1 = sum(dproc.cpu_times()[:2]), _scrape(maddr) if not bare else (0, {}), time.time()
        rss = dproc.memory_info().rss
        load1 = os.getloadavg()[0]
        for g in gens:
            g.wait(120)
        time.sleep(DEAD_TIMEOUT_S + 1.0)   # late false `dead` events would show up now
        states = [m.state for m in client.status("load").members]
    finally:
        client.close()
        for p in gens + [daemon]:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    results = [GenResult(**json.loads((tmp / f"gen{g}.json").read_text())) for g in range(len(gens))]
    lat = [x for r in results for x in r.latencies_ms]
    lag = [x for r in results for x in r.lag_ms]
    killed_at = max(r.killed_at for r in results)
    is_kill = lambda e: e["kind"] == "dead" and e["rank"] == kill_rank and killed_at and e["time"] >= killed_at
    dead = [e for e in events if is_kill(e)][:1]
    false = [e for e in events if e not in dead]
    detect = dead[0]["time"] - killed_at if dead and killed_at else None
    out = {
        "ranks": ranks, "server": a.server, "client": a.client, "connected_at_window_start": connected,
        "window_s": round(w1 - w0, 1), "sent_per_s": round(sum(r.window_heartbeats for r in results) / a.duration, 1),
        "ranks_per_node": a.ranks_per_node,
        "daemon_reports_per_s": None if bare else round((reports1 - reports0) / (w1 - w0), 1),
        "latency_samples": len(lat), "p50_ms": _pct(lat, 0.50), "p99_ms": _pct(lat, 0.99), "max_ms": max(lat, default=None),
        "daemon_delay_p99_ms_at_most": _p99_bound_ms(delay0, delay1),
        "generator_lag_p99_ms": _pct(lag, 0.99), "send_errors": sum(r.errors for r in results),
        "flow_blocked": sum(r.flow_blocked for r in results),
        "first_send_error": next((r.first_error for r in results if r.first_error), ""),
        "false_events": len(false), "false_event_examples": [e["message"] for e in false[:5]],
        "killed_rank_dead_after_s": detect,
        "daemon_cpu_pct": round(100 * (d_cpu1 - d_cpu0) / (w1 - w0), 1),
        "generators_cpu_pct": round(100 * sum(r.cpu_s for r in results) / a.duration, 1),
        "daemon_rss_mib": round(rss / 2**20), "loadavg_start_end": [round(load0, 2), round(load1, 2)],
        "final_states": {s: states.count(s) for s in sorted(set(states))},
    }
    fast = out["p99_ms"] is not None and out["p99_ms"] < TARGET_P99_MS and out["connected_at_window_start"] == ranks
    # The control has no detectors: it can only show whether gRPC alone keeps the latency.
    out["held"] = bool(fast and (bare or (out["false_events"] == 0 and detect is not None
                                          and detect <= DEAD_TIMEOUT_S + 1.0)))
    if out["held"] and not out["send_errors"]:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        out["logs"] = str(tmp)   # the daemon's log stays for a look
    return out


# ---------------------------------------------------------------- report
def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "lscpu unavailable"
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Hypervisor vendor")
    return "; ".join(" ".join(l.split()) for l in text.splitlines() if l.split(":")[0].strip() in keep)


def markdown(runs: list[dict], command: str) -> str:
    import grpc
    import psutil

    held = [r["ranks"] for r in runs if r["held"] and r["server"] == "daemon"]
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
    lines = [
        "# Health daemon load benchmark", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine (lscpu): {machine()}; memory {psutil.virtual_memory().total / 2**30:.0f} GiB",
        f"- software: Python {sys.version.split()[0]}, grpcio {grpc.__version__}",
        f"- command: `{command}`",
        f"- targets: p99 report latency < {TARGET_P99_MS:g} ms, zero false events, killed rank dead within "
        f"{DEAD_TIMEOUT_S:g} s timeout + 1 s",
        f"- **largest rank count held: {max(held) if held else 'none of those tried'}**", "",
        "| ranks | ranks/stream | server | client | held | heartbeats/s | p50 ms | p99 ms | max ms | samples | daemon-side p99 ms <= | false events | "
        "dead detected after s | daemon CPU % | generators CPU % | daemon RSS MiB | gen lag p99 ms | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['ranks']} | {r.get('ranks_per_node') or 1} | {r['server']} | {r['client']} | {'yes' if r['held'] else 'no'} | {r['sent_per_s']:.0f} | "
                     f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {r['latency_samples']} | "
                     f"{fmt(r['daemon_delay_p99_ms_at_most'], '{:g}')} | "
                     f"{r['false_events']} | {fmt(r['killed_rank_dead_after_s'], '{:.2f}')} | {r['daemon_cpu_pct']} | "
                     f"{r['generators_cpu_pct']} | {r['daemon_rss_mib']} | {fmt(r['generator_lag_p99_ms'])} | "
                     f"{r['loadavg_start_end'][0]} -> {r['loadavg_start_end'][1]} |")
    lines += ["", "Method: see the docstring of `bench/health_load.py`. Raw results:", "", "```json",
              json.dumps(runs, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m suanli.bench.health_load", description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=10_000, help="simulated ranks (default %(default)s)")
    ap.add_argument("--sweep", help="comma-separated rank counts to try, e.g. 2000,5000,10000")
    ap.add_argument("--duration", type=float, default=60.0, help="measurement window, s (default %(default)s)")
    ap.add_argument("--ramp", type=float, default=30.0, help="seconds over which ranks connect (default %(default)s)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after the ramp before measuring (default %(default)s)")
    ap.add_argument("--clients", type=int, default=1, help="load-generator processes (default %(default)s)")
    ap.add_argument("--channels", type=int, default=64, help="gRPC channels per generator (default %(default)s)")
    ap.add_argument("--ack-every", type=int, default=10, help="every Nth heartbeat of a rank is a latency probe")
    ap.add_argument("--client", choices=["h2", "aio"], default="h2",
                    help="h2: the built-in HTTP/2 gRPC client, cheap enough to share two cores with the daemon "
                         "(default); aio: grpc.aio, one call per rank (costs the generator ~100 us per heartbeat)")
    ap.add_argument("--ranks-per-node", type=int, default=0, metavar="N",
                    help="node mode: N ranks per simulated node relay, which sends one HeartbeatBatch of its ranks a "
                         "second on one ReportBatch stream (default 0: every rank has its own Report stream)")
    ap.add_argument("--server", choices=["daemon", "bare"], default="daemon",
                    help="daemon: `suanli health serve` (default); bare: the control, a grpc.aio server that only "
                         "stores heartbeats (no detectors, journal or metrics)")
    ap.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                    help="extra `suanli health serve` argument, e.g. --daemon-arg=--journal-interval=5 (repeatable)")
    ap.add_argument("--out", help="write the Markdown report here (e.g. bench/results/health-load.md)")
    # generator-process arguments (internal)
    ap.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare-server", metavar="ADDR", help=argparse.SUPPRESS)
    for name in ("--addr", "--job", "--result"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--first", "--count", "--total", "--kill-rank"):
        ap.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.generator:
        generator_main(a)
        return 0
    if a.bare_server:
        asyncio.run(_bare_server(a.bare_server))
        return 0
    if a.ack_every < 1 or a.channels < 1 or a.clients < 1:
        raise SystemExit("--ack-every, --channels and --clients must be at least 1")
    if a.ranks_per_node < 0 or (a.ranks_per_node and (a.client != "h2" or a.server != "daemon")):
        raise SystemExit(f"--ranks-per-node {a.ranks_per_node}: must be >= 0, and node mode needs --client h2 and "
                         f"--server daemon (the control and the aio client speak per-rank Report only)")
    counts = [int(x) for x in a.sweep.split(",")] if a.sweep else [a.ranks]
    runs = []
    for n in counts:
        r = run_once(n, a)
        print(json.dumps(r), flush=True)
        runs.append(r)
    report = markdown(runs, "python -m suanli.bench.health_load " + " ".join(sys.argv[1:] if argv is None else argv))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(report)
        print(f"wrote {a.out}")
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
