"""The node relay (`suanli health agent --relay-bind`): a real daemon, a real agent process
relaying, real reporter processes, all on 127.0.0.1. Heartbeats arrive per rank through the
relay; a killed rank is dead within timeout + one interval; DUMP_STACKS on a hang reaches
the right rank through the relay; a killed relay costs no rank a `dead` (reporters fall
back to the daemon); the token is enforced on ReportBatch, by the daemon and by the relay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from suanli.fault.health import DetectorConfig, HealthClient, start_daemon
from suanli.fault.proto import health_pb2 as pb
from suanli.fault.proto import health_pb2_grpc as pbg
from conftest import job_events, ranks_stepping, wait_for
from suanli.infra.launch import free_port, rank_env

WORKER = Path(__file__).parent / "workers" / "health_worker.py"
INTERVAL = 0.5
DEAD_AFTER = 3 * INTERVAL
DETECTORS = DetectorConfig(interval_s=INTERVAL, hang_floor_s=2.0, tick_s=0.1)
NOWHERE = "127.0.0.1:1"   # a daemon address nothing listens on: only the relay path works
TOKEN = "relay-tok-7c1e"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    h = start_daemon("127.0.0.1:0", str(tmp_path_factory.mktemp("relay") / "health.db"), detectors=DETECTORS)
    yield h
    h.stop()


def start_agent(procs, daemon_addr: str, node: str, *extra: str) -> tuple[subprocess.Popen, str]:
    relay = f"127.0.0.1:{free_port()}"
    agent = procs([sys.executable, "-m", "suanli.cli", "health", "agent", "--daemon", daemon_addr,
                   "--relay-bind", relay, "--node", node, "--interval", str(INTERVAL), *extra])
    line = agent.stdout.readline()
    assert "relaying ranks from" in line, line + agent.stdout.read()
    return agent, relay


def worker(mode: str, addr: str, job: str, run_dir, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), mode, "--addr", addr, "--job", job, "--run-dir", str(run_dir),
            "--interval", str(INTERVAL), *args]


def then_wait(hb: pb.Heartbeat, seconds: float = 5.0):
    """A request stream that stays open after its heartbeat, so the ack can come back."""
    yield hb
    time.sleep(seconds)


def test_heartbeats_arrive_per_rank_through_the_relay_and_a_killed_rank_is_dead(daemon, procs, tmp_path):
    client = HealthClient(daemon.address)
    _, relay = start_agent(procs, daemon.address, "relay-a")
    env = {"SUANLI_HEALTH_RELAY": relay}
    # The reporters' daemon address leads nowhere: what arrives came through the relay.
    healthy = procs(worker("steps", NOWHERE, "rel", tmp_path, "--ranks", "0,1,2", "--seconds", "120"), env)
    victim = procs(worker("steps", NOWHERE, "rel", tmp_path, "--ranks", "3", "--seconds", "120"), env)
    wait_for(lambda: ranks_stepping(client, "rel", 4), 60, "4 ranks stepping through the relay")
    members = {m.rank: m for m in client.status("rel").members}
    assert sorted(members) == [0, 1, 2, 3] and all(m.heartbeat_age_s < 2 * INTERVAL for m in members.values())
    node = [m for m in client.status().members if m.rank < 0 and m.node == "relay-a"]
    assert len(node) == 1 and node[0].state == "ok", "the relay's own node heartbeat rides in the batches"
    time.sleep(1.0)
    killed_at = time.time()
    os.killpg(victim.pid, signal.SIGKILL)
    dead = wait_for(lambda: [e for e in job_events(client, "rel") if e["kind"] == "dead"], 10, "the dead event")
    assert dead[0]["rank"] == 3
    latency = dead[0]["time"] - killed_at
    assert latency <= DEAD_AFTER + INTERVAL, f"dead reported {latency:.2f} s after the kill"
    healthy.terminate()   # finishes its ranks cleanly
    out, _ = healthy.communicate(timeout=60)
    assert healthy.returncode == 0, out
    time.sleep(DEAD_AFTER + 0.5)
    assert [(e["kind"], e["rank"]) for e in job_events(client, "rel")] == [("dead", 3)]
    assert {m.rank: m.state for m in client.status("rel").members} == {0: "done", 1: "done", 2: "done", 3: "dead"}


def test_dump_stacks_on_a_hang_reaches_the_suspect_through_the_relay(daemon, procs, tmp_path):
    client = HealthClient(daemon.address)
    _, relay = start_agent(procs, daemon.address, "relay-b")
    port, world = free_port(), 3
    args = worker("gloo", NOWHERE, "rgloo", tmp_path, "--hang-rank", "2", "--hang-after", "15", "--step-time", "0.05")
    for r in range(world):
        procs(args, env=rank_env(r, world, port, extra={"SUANLI_HEALTH_RELAY": relay}))
    hung = wait_for(lambda: [e for e in job_events(client, "rgloo") if e["kind"] == "hung"], 90, "the hung event")
    ev = hung[0]
    assert ev["rank"] == 2 and ev["detail"]["suspects"] == [2], ev
    stack = Path(ev["detail"]["stacks"]["2"])
    assert stack.is_file() and stack.parent == tmp_path / "stacks" and stack.name.startswith("rank2-")
    assert "hang_forever" in stack.read_text()
    peer = wait_for(lambda: sorted((tmp_path / "stacks").glob("rank0-*.txt")), 10, "rank 0's stack dump")
    assert "all_reduce" in peer[0].read_text()


def test_killed_relay_reporters_fall_back_to_the_daemon_and_no_rank_is_dead(daemon, procs, tmp_path):
    client = HealthClient(daemon.address)
    agent, relay = start_agent(procs, daemon.address, "relay-c")
    ranks = procs(worker("steps", daemon.address, "fall", tmp_path, "--ranks", "0,1,2,3", "--seconds", "120"),
                  {"SUANLI_HEALTH_RELAY": relay})
    wait_for(lambda: ranks_stepping(client, "fall", 4), 60, "4 ranks stepping")
    os.killpg(agent.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # Through the daemon now: every rank's heartbeat age stays under one dead timeout.
    worst = 0.0
    while time.monotonic() - killed_at < 3 * DEAD_AFTER:
        ages = [m.heartbeat_age_s for m in client.status("fall").members]
        worst = max(worst, *ages)
        time.sleep(0.05)
    assert worst < DEAD_AFTER, f"a rank went {worst:.2f} s without a heartbeat after the relay died"
    assert [e for e in job_events(client, "fall")] == [], "no events: the relay's death is no rank's death"
    steps_before = {m.rank: m.step for m in client.status("fall").members}
    wait_for(lambda: all(m.step > steps_before[m.rank] + 2 for m in client.status("fall").members), 10,
             "steps still advancing via the daemon")
    ranks.terminate()
    assert ranks.wait(60) == 0


def test_token_is_enforced_on_report_batch_by_daemon_and_relay(procs, tmp_path):
    with start_daemon("127.0.0.1:0", str(tmp_path / "t.db"), token=TOKEN, detectors=DETECTORS) as d:
        batch = pb.HeartbeatBatch(seq=1, ack=True, heartbeats=[pb.Heartbeat(job="tok", rank=0, node="n", ack=True)])
        channel = grpc.insecure_channel(d.address)
        stub = pbg.HealthStub(channel)
        for md in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.ReportBatch(iter([batch]), metadata=md, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (reply,) = list(stub.ReportBatch(iter([batch]), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10))
        assert reply.seq == 1 and [(r.job, r.rank) for r in reply.replies] == [("tok", 0)]
        channel.close()

        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        _, relay = start_agent(procs, d.address, "relay-d", "--token-file", str(token_file))
        rchannel = grpc.insecure_channel(relay)
        hb = pb.Heartbeat(job="tok", rank=1, node="n", pid=5, ack=True)
        with pytest.raises(grpc.RpcError) as e:
            list(pbg.HealthStub(rchannel).Report(iter([hb]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # With the token, the relay forwards upstream (with its own token) and routes the ack back.
        call = pbg.HealthStub(rchannel).Report(then_wait(hb), metadata=(("authorization", f"Bearer {TOKEN}"),),
                                               timeout=10)
        assert next(call).seq == 0
        call.cancel()
        assert any(m.rank == 1 for m in HealthClient(d.address, TOKEN).status("tok").members)
        rchannel.close()


def test_a_bad_heartbeat_ends_only_its_own_stream_at_the_relay(daemon, procs):
    _, relay = start_agent(procs, daemon.address, "relay-e")
    stub = pbg.HealthStub(grpc.insecure_channel(relay))
    bad = pb.Heartbeat(job="bad", rank=3, node="n", world_size=2)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Report(iter([bad]), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be below world_size=2" in e.value.details()
    good = pb.Heartbeat(job="good", rank=0, node="n", pid=7, ack=True)
    call = stub.Report(then_wait(good), timeout=10)
    assert next(call).seq == 0
    call.cancel()
    assert any(m.job == "good" for m in HealthClient(daemon.address).status("good").members)


def test_daemon_restart_the_relay_reconnects_and_no_event_is_raised(procs, tmp_path):
    addr, db = f"127.0.0.1:{free_port()}", tmp_path / "health.db"
    serve = [sys.executable, "-m", "suanli.cli", "health", "serve", "--bind", addr, "--db", str(db), "--interval",
             str(INTERVAL), "--detector", "tick_s=0.1", "--journal-interval", "1"]
    daemon = procs(serve)
    client = HealthClient(addr, timeout_s=2)

    def status(job: str):
        try:
            return list(client.status(job).members)
        except RuntimeError:   # not serving (yet)
            return []

    wait_for(lambda: _serving(client), 60, "the daemon")
    _, relay = start_agent(procs, addr, "relay-f")
    procs(worker("steps", NOWHERE, "rs", tmp_path, "--ranks", "0,1", "--seconds", "120"),
          {"SUANLI_HEALTH_RELAY": relay})
    wait_for(lambda: len(status("rs")) == 2 and all(m.step >= 3 for m in status("rs")), 60, "2 ranks via the relay")
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait(10)
    time.sleep(2 * INTERVAL)
    procs(serve)
    before = {m.rank: m.step for m in wait_for(lambda: status("rs"), 60, "the restarted daemon")}
    wait_for(lambda: len(status("rs")) == 2 and all(m.step > before[m.rank] + 3 and m.heartbeat_age_s < 2 * INTERVAL
                                                   for m in status("rs")), 30, "the ranks back through the relay")
    time.sleep(3 * INTERVAL)
    assert job_events(client, "rs") == [], "a daemon restart behind a relay raises no event"
    client.close()


def _serving(client: HealthClient) -> bool:
    try:
        client.status("none")
        return True
    except RuntimeError:
        return False


def test_a_nodes_aligned_ranks_go_upstream_together(daemon):
    """Reporters of one node send on the same wall-clock phase; the relay sends each round
    as one batch (the node's own heartbeat riding along)."""
    import threading

    from suanli.fault.health import HeartbeatReporter
    from suanli.fault.health.relay import run_relay

    ready, stop = [], threading.Event()
    t = threading.Thread(target=run_relay, kwargs=dict(addr=daemon.address, relay_bind=f"127.0.0.1:{free_port()}",
                                                       node="relay-g", interval_s=INTERVAL, stop=stop,
                                                       on_ready=ready.append), daemon=True)
    t.start()
    relay = wait_for(lambda: ready and ready[0], 30, "the relay")
    reps = [HeartbeatReporter(NOWHERE, relay=relay.address, job="align", rank=r, node="relay-g",
                              interval_s=INTERVAL).start() for r in range(4)]
    try:
        wait_for(lambda: all(r.connected and r.via_relay for r in reps), 30, "reporters via the relay")
        b0, f0 = relay.batches, relay.forwarded
        time.sleep(10 * INTERVAL)
        batches, forwarded = relay.batches - b0, relay.forwarded - f0
        assert forwarded >= 4 * 8, forwarded
        assert forwarded / batches >= 3.0, f"{forwarded} heartbeats in {batches} batches: not coalesced"
    finally:
        for r in reps:
            r.stop()
        stop.set()
        t.join(30)
