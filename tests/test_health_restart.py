"""A daemon killed mid-run (SIGKILL, no goodbye) and started again on the same journal has
its events and every rank's last state back at once, the ranks reconnect on their own, and
the outage raises no false event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from suanli.fault.health import HealthClient
from suanli.fault.health.client import event_dict
from suanli.infra.launch import free_port

WORKER = Path(__file__).parent / "workers" / "health_worker.py"
INTERVAL = 0.5


def start_daemon_process(addr: str, db: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "suanli.cli", "health", "serve", "--bind", addr, "--db", str(db),
           "--interval", str(INTERVAL), "--hang-floor", "3", "--detector", "tick_s=0.1", "--journal-interval", "1"]
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except RuntimeError:   # daemon not up yet
            v = None
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_daemon_restart_mid_run_loses_nothing_and_ranks_reconnect(tmp_path):
    addr, db, log = f"127.0.0.1:{free_port()}", tmp_path / "health.db", tmp_path / "daemon.log"
    procs = [start_daemon_process(addr, db, log)]
    client = HealthClient(addr, timeout_s=2)
    try:
        worker = subprocess.Popen([sys.executable, str(WORKER), "steps", "--addr", addr, "--job", "rs", "--run-dir",
                                   str(tmp_path), "--interval", str(INTERVAL), "--ranks", "0,1", "--spike", "1:5",
                                   "--seconds", "300"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        procs.append(worker)
        wait_for(lambda: [e for e in client.events(job="rs") if e.kind], 90, "the diverging event")
        wait_for(lambda: all(m.step >= 10 for m in client.status("rs").members) and
                 len(client.status("rs").members) == 2, 30, "both ranks at step 10")
        time.sleep(1.5)   # one journal interval, so the snapshot holds step >= 10
        before = {m.rank: m.step for m in client.status("rs").members}
        events_before = [event_dict(e) for e in client.events(job="rs")]
        assert [(e["kind"], e["rank"]) for e in events_before] == [("diverging", 1)]

        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        time.sleep(2 * INTERVAL)   # ranks notice and start retrying
        procs[0] = start_daemon_process(addr, db, log)

        # State and history are back as soon as it serves, before any rank reconnects.
        restored = wait_for(lambda: client.status("rs"), 60, "the restarted daemon")
        assert {m.rank: m.step for m in restored.members}.keys() == {0, 1}
        assert all(m.step >= 10 for m in restored.members)
        assert [event_dict(e) for e in client.events(job="rs")][:1] == events_before
        # The ranks reconnect by themselves and carry on from where they were.
        wait_for(lambda: all(m.step > before[m.rank] + 5 and m.heartbeat_age_s < 2 * INTERVAL
                             for m in client.status("rs").members), 30, "the ranks reporting again")
        time.sleep(3 * INTERVAL)
        after = [event_dict(e) for e in client.events(job="rs")]
        assert [(e["kind"], e["rank"]) for e in after] == [("diverging", 1)], \
            f"the outage must not raise events: {[e['message'] for e in after]}"
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
        done = [json.loads(l[3:]) for l in out.splitlines() if l.startswith("HW {") and "connects" in l]
        assert sorted(d["rank"] for d in done) == [0, 1]
        assert all(d["connects"] >= 2 for d in done), done
    finally:
        client.close()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
