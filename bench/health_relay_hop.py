"""What the node relay's hop costs a heartbeat: real reporters (HeartbeatReporter threads in a
few processes, as ranks of one node) send to the daemon directly, then through a real
`suanli health agent --relay-bind` process; the daemon (in this process) records, for every
heartbeat it applies, sent (the reporter's clock) -> applied (same host, same clock).

    python -m suanli.bench.health_relay_hop --ranks 32 --seconds 30 --out bench/results/health-relay-hop.md

Added latency = via-relay percentile - direct percentile.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _pct(values: list, q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def reporters_main(a) -> None:
    """Internal: run ranks first..first+count-1 as HeartbeatReporter threads until SIGTERM."""
    from suanli.fault.health.reporter import HeartbeatReporter

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    reps = [HeartbeatReporter(a.addr, job=a.job, rank=r, node="hop-node", run_dir=tempfile.gettempdir()).start()
            for r in range(a.first, a.first + a.count)]
    step = 0
    while not stop.wait(0.1):
        step += 1
        for r in reps:
            r.update(step=step, phase="forward", step_time_s=0.1)
    for r in reps:
        r.stop(done=True)


def measure(a, via_relay: bool, daemon) -> dict:
    """One run: ranks report for `seconds`; returns the delays of the heartbeats in the window."""
    from suanli.infra.launch import free_port

    job = "hop-relay" if via_relay else "hop-direct"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUANLI_ACCELERATOR": "cpu"}
    env.pop("SUANLI_HEALTH_RELAY", None)
    procs = []
    if via_relay:
        relay = f"127.0.0.1:{free_port()}"
        agent = subprocess.Popen([sys.executable, "-m", "suanli.cli", "health", "agent", "--daemon", daemon.address,
                                  "--relay-bind", relay, "--node", "hop-node"],
                                 env=env, stdout=subprocess.PIPE, text=True)
        if "relaying" not in agent.stdout.readline():
            raise RuntimeError("the relay agent did not start")
        procs.append(agent)
        env["SUANLI_HEALTH_RELAY"] = relay
    # Via the relay, the reporters' daemon address leads nowhere, so nothing can bypass it.
    target = "127.0.0.1:1" if via_relay else daemon.address
    per = -(-a.ranks // a.procs)
    for p in range(a.procs):
        first, count = p * per, min(per, a.ranks - p * per)
        procs.insert(0, subprocess.Popen([sys.executable, "-m", "suanli.bench.health_relay_hop", "--reporters",
                                          "--addr", target, "--job", job, "--first", str(first),
                                          "--count", str(count)], env=env))
    delays: list[float] = []
    t0 = time.time() + a.warmup
    t1 = t0 + a.seconds
    daemon.recording[job] = (t0, t1, delays)
    time.sleep(max(0.0, t1 - time.time()) + 0.5)
    for p in procs:
        p.terminate()
        p.wait(30)
    del daemon.recording[job]
    ms = [d * 1e3 for d in delays]
    return {"path": "relay" if via_relay else "direct", "heartbeats": len(ms), "p50_ms": _pct(ms, 0.5),
            "p90_ms": _pct(ms, 0.9), "p99_ms": _pct(ms, 0.99), "max_ms": max(ms, default=None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m suanli.bench.health_relay_hop", description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=32, help="reporters on the simulated node (default %(default)s)")
    ap.add_argument("--procs", type=int, default=4, help="processes they run in (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement window per path (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before the window (imports, connects)")
    ap.add_argument("--out", help="write the Markdown report here")
    ap.add_argument("--reporters", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.reporters:
        reporters_main(a)
        return 0
    if a.ranks < 1 or a.procs < 1 or a.seconds <= 0:
        raise SystemExit("--ranks, --procs and --seconds must be positive")
    from suanli.fault.health import start_daemon

    tmp = Path(tempfile.mkdtemp(prefix="relay-hop-"))
    daemon = start_daemon("127.0.0.1:0", str(tmp / "h.db"))
    daemon.recording = {}
    engine, apply = daemon.engine, daemon.engine.heartbeat

    def recorded(hb):   # on the daemon's loop: exact arrival time of every heartbeat
        rec = daemon.recording.get(hb.job)
        if rec is not None and rec[0] <= hb.sent_unix < rec[1]:
            rec[2].append(time.time() - hb.sent_unix)
        return apply(hb)

    engine.heartbeat = recorded
    try:
        runs = [measure(a, False, daemon), measure(a, True, daemon)]
    finally:
        daemon.stop()
    direct, relay = runs
    added = {k: None if relay[k] is None or direct[k] is None else relay[k] - direct[k]
             for k in ("p50_ms", "p90_ms", "p99_ms")}
    from suanli.bench.health_load import machine

    cmd = "python -m suanli.bench.health_relay_hop " + " ".join(sys.argv[1:] if argv is None else argv)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    lines = ["# Node relay hop: heartbeat sent -> applied by the daemon, direct vs through the relay", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"- machine (lscpu): {machine()}",
             f"- command: `{cmd}`",
             f"- {a.ranks} real HeartbeatReporter threads in {a.procs} processes (one simulated node, 1 s interval, "
             f"wall-clock aligned), a real `suanli health agent --relay-bind` process, the daemon in the bench "
             f"process; {a.seconds:g} s per path", "",
             "| path | heartbeats | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['heartbeats']} | {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} | "
              f"{fmt(r['max_ms'])} |" for r in runs]
    lines += [f"| **added by the relay** | | {fmt(added['p50_ms'])} | {fmt(added['p90_ms'])} | "
              f"{fmt(added['p99_ms'])} | |",
              "", "```json", json.dumps({"runs": runs, "added": added}, indent=1), "```", ""]
    report = "\n".join(lines)
    if a.out:
        Path(a.out).write_text(report)
        print(f"wrote {a.out}")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
