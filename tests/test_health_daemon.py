"""A real health daemon on 127.0.0.1 with real reporters in separate processes: a killed rank
is dead within timeout + one interval; a rank that stops in front of a gloo all_reduce is
hung and named the suspect, and its stacks are on disk; a slowed rank is a straggler;
healthy ranks raise nothing. Plus the views: status, events, /metrics, reflection and the
standard health-checking service."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from suanli.cli import main as cli_main
from suanli.fault.health import DetectorConfig, HealthClient, start_daemon
from suanli.fault.health.client import event_dict
from conftest import job_events, ranks_stepping, wait_for
from suanli.infra.launch import free_port, rank_env

WORKER = Path(__file__).parent / "workers" / "health_worker.py"
INTERVAL = 0.5
DEAD_AFTER = 3 * INTERVAL
DETECTORS = DetectorConfig(interval_s=INTERVAL, hang_floor_s=2.0, straggler_persist_s=1.0, tick_s=0.1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = tmp_path_factory.mktemp("health")
    h = start_daemon("127.0.0.1:0", str(d / "health.db"), metrics_bind="127.0.0.1:0", detectors=DETECTORS)
    yield h
    h.stop()


def test_killed_rank_dead_slow_rank_straggler_healthy_ranks_quiet(daemon, procs, tmp_path):
    client = HealthClient(daemon.address)
    common = ["--addr", daemon.address, "--job", "mix", "--run-dir", str(tmp_path), "--interval", str(INTERVAL)]
    steps = [sys.executable, str(WORKER), "steps", *common]
    healthy = procs([*steps, "--ranks", "0,1,2", "--slow", "2:0.3", "--seconds", "120"])
    victim = procs([*steps, "--ranks", "3", "--seconds", "120"])
    wait_for(lambda: ranks_stepping(client, "mix", 4), 60, "4 ranks stepping")
    time.sleep(1.0)
    killed_at = time.time()
    os.killpg(victim.pid, signal.SIGKILL)
    dead = wait_for(lambda: [e for e in job_events(client, "mix") if e["kind"] == "dead"], 10, "the dead event")
    assert dead[0]["rank"] == 3
    latency = dead[0]["time"] - killed_at
    assert latency <= DEAD_AFTER + INTERVAL, f"dead reported {latency:.2f} s after the kill"

    wait_for(lambda: [e for e in job_events(client, "mix") if e["kind"] == "straggler"], 20, "the straggler event")
    healthy.terminate()   # the worker finishes its ranks cleanly on SIGTERM
    out, _ = healthy.communicate(timeout=60)
    assert healthy.returncode == 0, out
    time.sleep(DEAD_AFTER + 0.5)   # long enough that a finished rank would be called dead if it were
    events = [(e["kind"], e["rank"]) for e in job_events(client, "mix")]
    assert sorted(events) == [("dead", 3), ("straggler", 2)], events
    states = {m.rank: m.state for m in client.status("mix").members}
    assert states == {0: "done", 1: "done", 2: "done", 3: "dead"}


def test_rank_stuck_before_a_gloo_collective_is_the_hung_suspect_and_dumps_stacks(daemon, procs, tmp_path):
    client = HealthClient(daemon.address)
    port, world = free_port(), 3
    args = ["gloo", "--addr", daemon.address, "--job", "gloo", "--run-dir", str(tmp_path), "--interval",
            str(INTERVAL), "--hang-rank", "2", "--hang-after", "15", "--step-time", "0.05"]
    for r in range(world):
        procs([sys.executable, str(WORKER), *args], env=rank_env(r, world, port))
    hung = wait_for(lambda: [e for e in job_events(client, "gloo") if e["kind"] == "hung"], 90, "the hung event")
    ev = hung[0]
    assert ev["rank"] == 2 and ev["detail"]["suspects"] == [2], ev
    assert set(ev["detail"]["stalled"]) == {0, 1}
    assert [e["kind"] for e in job_events(client, "gloo")] == ["hung"], "nothing before the hang"
    stack = Path(ev["detail"]["stacks"]["2"])
    assert stack.is_file() and stack.parent == tmp_path / "stacks"
    assert "hang_forever" in stack.read_text()
    # The peers wait inside all_reduce; their own reporter threads wrote where.
    peer = wait_for(lambda: sorted((tmp_path / "stacks").glob("rank0-*.txt")), 10, "rank 0's stack dump")
    assert "all_reduce" in peer[0].read_text()
    states = {m.rank: m.state for m in client.status("gloo").members}
    assert states == {0: "stalled", 1: "stalled", 2: "hung"}


def test_views_status_events_metrics_reflection_health(daemon, capsys):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from suanli.fault.health import HeartbeatReporter

    with HeartbeatReporter(daemon.address, job="views", rank=0, interval_s=0.1) as rep:
        rep.update(step=7, phase="backward", loss=1.5, step_time_s=0.2, tokens_per_s=5000.0, mfu=0.4)
        wait_for(lambda: any(m.step == 7 for m in HealthClient(daemon.address).status("views").members), 10, "step 7")
        assert cli_main(["health", "status", "--addr", daemon.address, "--job", "views"]) == 0
        table = capsys.readouterr().out
        assert "views" in table and "backward" in table and "STATE" in table
        assert cli_main(["health", "status", "--addr", daemon.address, "--job", "views", "--json"]) == 0
        (m,) = json.loads(capsys.readouterr().out)["members"]
        assert (m["rank"], m["state"], m["step"], m["mfu"]) == (0, "ok", 7, 0.4)
        text = urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=10).read().decode()
        for name in ("suanli_health_heartbeat_age_seconds", "suanli_health_step", "suanli_health_step_time_seconds",
                     "suanli_health_tokens_per_second", "suanli_health_mfu", "suanli_health_events_total",
                     "suanli_health_report_delay_seconds_bucket"):
            assert name in text
        assert 'suanli_health_step{job="views",node=' in text
    assert cli_main(["health", "events", "--addr", daemon.address, "--json", "--job", "views"]) == 0
    assert capsys.readouterr().out == ""   # a clean run: no events

    channel = grpc.insecure_channel(daemon.address)
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"suanli.health.v1.Health", "grpc.health.v1.Health"} <= services
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_watch_follows_new_events_and_node_agent_reports(daemon):
    import threading

    from suanli.fault.health import HeartbeatReporter
    from suanli.fault.health.agent import run_agent

    client = HealthClient(daemon.address)
    start_id = max([e.id for e in client.events()], default=0)
    seen: list = []

    def follow():
        for e in HealthClient(daemon.address).events(since_id=start_id, job="watch", follow=True):
            seen.append(event_dict(e))
            return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    with HeartbeatReporter(daemon.address, job="watch", rank=0, interval_s=0.1) as rep:
        rep.update(step=1, loss=float("nan"))
        t.join(15)
    assert seen and seen[0]["kind"] == "diverging" and "nan" in seen[0]["message"]

    assert run_agent(daemon.address, node="agent-test", interval_s=0.1, max_beats=3) == 0
    (node,) = [m for m in client.status().members if m.node == "agent-test" and m.rank == -1]
    assert node.state == "done"
