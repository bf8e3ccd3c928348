"""The detectors and the engine on a fake clock: which rank is dead, hung (and the suspect),
stalled, straggling, diverging or unhealthy; events only on changes; the hung event waits
for stack dumps; a restarted engine carries on from the journal."""

from __future__ import annotations

import json

import pytest

from suanli.fault.health.detectors import DetectorConfig, health_problems
from suanli.fault.health.engine import Engine
from suanli.fault.health.state import EVENT_NAMES
from suanli.fault.health.store import Store
from suanli.fault.proto import health_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def cfg(**kw) -> DetectorConfig:
    base = dict(interval_s=1.0, hang_floor_s=5.0, hang_k=3.0, straggler_persist_s=3.0, diverging_hold_s=10.0)
    return DetectorConfig(**{**base, **kw})


def hb(rank, step, coll=None, job="j", phase=pb.PHASE_FORWARD, st=0.5, pid=100, **kw) -> pb.Heartbeat:
    return pb.Heartbeat(job=job, rank=rank, node=f"n{rank}", pid=pid + rank, step=step,
                        collectives=step if coll is None else coll, phase=phase, step_time_s=st, **kw)


def kinds(engine: Engine) -> list[tuple[str, int]]:
    return [(EVENT_NAMES[e.kind], e.rank) for e in engine.ring]


def run(engine: Engine, clock: Clock, seconds: float, beat, dt: float = 0.5) -> None:
    """Advance time, calling beat(step_index) every dt and ticking the detectors."""
    steps = int(round(seconds / dt))
    for i in range(steps):
        clock.t += dt
        beat(i)
        engine.tick()


def test_healthy_job_has_no_events_and_dead_is_timeout_based():
    clock = Clock()
    e = Engine(cfg(), clock=clock, wall=clock)
    state = {"step": 0}

    def beat(i, ranks=(0, 1, 2)):
        state["step"] += 1
        for r in ranks:
            e.heartbeat(hb(r, state["step"]))

    run(e, clock, 30, beat)
    assert kinds(e) == []
    run(e, clock, 2.5, lambda i: beat(i, ranks=(0, 1)))   # rank 2 silent for 2.5 s < 3 s
    assert kinds(e) == []
    run(e, clock, 1.0, lambda i: beat(i, ranks=(0, 1)))
    assert kinds(e) == [("dead", 2)]
    assert e.members["j/2"].state == "dead"
    run(e, clock, 1.0, beat)                                # it comes back
    assert kinds(e) == [("dead", 2), ("recovered", 2)]


def test_done_rank_is_never_dead():
    clock = Clock()
    e = Engine(cfg(), clock=clock, wall=clock)
    e.heartbeat(hb(0, 5, phase=pb.PHASE_DONE))
    run(e, clock, 20, lambda i: None)
    assert kinds(e) == [] and e.members["j/0"].state == "done"


def test_hang_names_the_lagging_rank_and_waits_for_its_stacks():
    clock = Clock()
    e = Engine(cfg(), clock=clock, wall=clock)
    state = {"step": 0}

    def healthy(i):
        state["step"] += 1
        for r in range(4):
            e.heartbeat(hb(r, state["step"]))

    run(e, clock, 10, healthy)
    s = state["step"]
    # Ranks 0, 1, 3 issued the next all_reduce; rank 2 never did. Heartbeats keep coming.
    stuck = lambda i: [e.heartbeat(hb(r, s, coll=s + (r != 2))) for r in range(4)]
    run(e, clock, 5.0, stuck)
    assert kinds(e) == []                                    # budget max(3 x 0.5, 5) not yet spent
    clock.t += 0.5
    stuck(0)
    e.tick()
    m2 = e.members["j/2"]
    assert kinds(e) == [] and m2.hang_seen_at, "the event waits for the dump"
    cmds = e.heartbeat(hb(2, s, coll=s))
    assert [c.kind for c in cmds] == [pb.COMMAND_DUMP_STACKS]
    clock.t += 0.5
    stuck(0)
    e.tick()                                                 # the peers are past their budget now
    peer_cmds = e.heartbeat(hb(0, s, coll=s + 1))
    assert [c.kind for c in peer_cmds] == [pb.COMMAND_DUMP_STACKS], "stalled peers dump too"
    assert kinds(e) == []
    e.heartbeat(hb(2, s, coll=s, dumped_id=cmds[0].id, dump_path="/run/stacks/rank2.txt"))
    e.tick()
    assert kinds(e) == [("hung", 2)]
    detail = json.loads(e.ring[-1].detail_json)
    assert detail["suspects"] == [2] and detail["stalled"] == [0, 1, 3]
    assert detail["stacks"]["2"] == "/run/stacks/rank2.txt"
    assert {r: e.members[f"j/{r}"].state for r in range(4)} == {0: "stalled", 1: "stalled", 2: "hung", 3: "stalled"}
    run(e, clock, 2, healthy)                                # it moves again
    assert kinds(e) == [("hung", 2), ("recovered", 2)]


def test_hang_event_goes_out_without_dump_after_dump_wait():
    clock = Clock()
    e = Engine(cfg(), clock=clock, wall=clock)
    run(e, clock, 3, lambda i: [e.heartbeat(hb(r, i + 1)) for r in range(2)])
    run(e, clock, 9, lambda i: [e.heartbeat(hb(r, 6, coll=6 + r)) for r in range(2)])
    assert kinds(e) == [("hung", 0)]


def test_hang_without_lag_picks_the_odd_phase_and_checkpoint_has_its_own_budget():
    clock = Clock()
    e = Engine(cfg(checkpoint_budget_s=60.0), clock=clock, wall=clock)
    run(e, clock, 3, lambda i: [e.heartbeat(hb(r, i + 1)) for r in range(3)])
    phases = {0: pb.PHASE_BACKWARD, 1: pb.PHASE_DATA, 2: pb.PHASE_BACKWARD}
    run(e, clock, 10, lambda i: [e.heartbeat(hb(r, 6, phase=phases[r])) for r in range(3)])
    assert kinds(e) == [("hung", 1)]

    e2 = Engine(cfg(checkpoint_budget_s=60.0), clock=clock, wall=clock)
    run(e2, clock, 3, lambda i: [e2.heartbeat(hb(r, i + 1)) for r in range(3)])
    run(e2, clock, 30, lambda i: [e2.heartbeat(hb(r, 6, phase=pb.PHASE_CHECKPOINT)) for r in range(3)])
    assert kinds(e2) == [], "a 30 s checkpoint is within its 60 s budget"


def test_dead_peer_is_not_blamed_on_a_live_rank():
    clock = Clock()
    e = Engine(cfg(), clock=clock, wall=clock)
    run(e, clock, 3, lambda i: [e.heartbeat(hb(r, i + 1)) for r in range(3)])
    run(e, clock, 10, lambda i: [e.heartbeat(hb(r, 6, coll=6 + r)) for r in range(2)])
    assert kinds(e) == [("dead", 2)]
    assert e.members["j/0"].state == "stalled"


def test_straggler_needs_persistence_and_clears_with_hysteresis():
    clock = Clock()
    e = Engine(cfg(), clock=clock, wall=clock)
    st = {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}
    n = {"step": 0}

    def beat(i):
        n["step"] += 1
        for r in range(4):
            e.heartbeat(hb(r, n["step"], st=st[r]))

    run(e, clock, 5, beat)
    st[3] = 1.0                       # 2x the median
    run(e, clock, 2.0, beat)
    assert kinds(e) == [], "not yet persistent"
    run(e, clock, 3.0, beat)
    assert kinds(e) == [("straggler", 3)]
    st[3] = 0.7                       # 1.4x: above the clear factor 1.25, still a straggler
    run(e, clock, 5, beat)
    assert kinds(e) == [("straggler", 3)]
    st[3] = 0.5
    run(e, clock, 5, beat)
    assert kinds(e) == [("straggler", 3), ("recovered", 3)]


def test_diverging_from_guard_counters_and_nonfinite_loss():
    clock = Clock()
    e = Engine(cfg(), clock=clock, wall=clock)
    run(e, clock, 2, lambda i: [e.heartbeat(hb(r, i + 1, loss=1.0)) for r in range(2)])
    e.heartbeat(hb(1, 5, spike_count=1, loss=9.0))
    e.tick()
    assert kinds(e) == [("diverging", 1)]
    assert "1 loss spike" in e.ring[-1].message
    run(e, clock, 12, lambda i: [e.heartbeat(hb(r, 6 + i, spike_count=r, loss=1.0)) for r in range(2)])
    assert kinds(e)[-1] == ("recovered", 1)
    e.heartbeat(hb(0, 40, loss=float("nan")))
    e.tick()
    assert kinds(e)[-1] == ("diverging", 0) and "nan" in e.ring[-1].message


def test_unhealthy_limits():
    c = cfg()
    hot = pb.DeviceHealth(index=3, temperature_c=95.0)
    ecc = pb.DeviceHealth(index=1, ecc_errors_uncorrected=2)
    fine = pb.DeviceHealth(index=0, temperature_c=60.0)
    host = pb.HostMetrics(memory_used_bytes=99, memory_total_bytes=100, disk_free_bytes=10, disk_total_bytes=100,
                          disk_path="/data")
    text = health_problems([hot, ecc, fine], host, c)
    assert "device 3 at 95 C" in text and "device 1 has 2 uncorrected ECC" in text
    assert "host memory 99.0%" in text and "disk /data" in text
    assert health_problems([fine], pb.HostMetrics(memory_total_bytes=100, memory_used_bytes=10,
                                                  disk_free_bytes=1 << 40, disk_total_bytes=1 << 41), c) == ""
    clock = Clock()
    e = Engine(c, clock=clock, wall=clock)
    e.node_heartbeat(pb.NodeHeartbeat(node="gpu7", pid=9, devices=[hot]))
    e.tick()
    assert kinds(e) == [("unhealthy", -1)] and "node gpu7" in e.ring[-1].message


def test_restart_from_journal_keeps_events_state_and_gives_live_ranks_grace(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "h.db")
    e = Engine(cfg(), store, clock=clock, wall=clock)
    run(e, clock, 3, lambda i: [e.heartbeat(hb(r, i + 1)) for r in range(3)])
    run(e, clock, 4, lambda i: [e.heartbeat(hb(r, 7 + i)) for r in range(2)])
    assert kinds(e) == [("dead", 2)]
    store.put_members(e.rows(list(e.members.values())))
    store.close()

    clock.t += 60   # the daemon was down for a minute
    store2 = Store(tmp_path / "h.db")
    e2 = Engine(cfg(), store2, clock=clock, wall=clock)
    assert kinds(e2) == [("dead", 2)], "history is back"
    assert e2.members["j/0"].step == 14 and e2.members["j/2"].state == "dead"
    e2.tick()
    assert kinds(e2) == [("dead", 2)], "no duplicate dead, no false dead for ranks that have not reconnected yet"
    run(e2, clock, 2, lambda i: [e2.heartbeat(hb(r, 15 + i)) for r in range(2)])
    assert kinds(e2) == [("dead", 2)]
    assert e2.next_event_id == 2
    store2.close()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="hang_floor_s"):
        DetectorConfig(hang_floor_s=-1)
    with pytest.raises(ValueError, match="straggler_clear_factor"):
        DetectorConfig(straggler_factor=1.2, straggler_clear_factor=1.5)
    assert DetectorConfig.from_pairs(["straggler_factor=2", "straggler_min_steps=5"]).straggler_min_steps == 5
    with pytest.raises(ValueError, match="NAME=VALUE"):
        DetectorConfig.from_pairs(["nope=1"])


def test_restart_keeps_a_hung_rank_hung_and_a_divergence_raised(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "h.db")
    e = Engine(cfg(diverging_hold_s=60), store, clock=clock, wall=clock)
    run(e, clock, 3, lambda i: [e.heartbeat(hb(r, i + 1, spike_count=int(r == 0 and i >= 4))) for r in range(2)])
    run(e, clock, 9, lambda i: [e.heartbeat(hb(r, 6, coll=6 + r, spike_count=int(r == 0))) for r in range(2)])
    assert sorted(kinds(e)) == [("diverging", 0), ("hung", 0)]
    store.put_members(e.rows(list(e.members.values())))
    store.close()
    clock.t += 5
    store2 = Store(tmp_path / "h.db")
    e2 = Engine(cfg(diverging_hold_s=60), store2, clock=clock, wall=clock)
    run(e2, clock, 2, lambda i: [e2.heartbeat(hb(r, 6, coll=6 + r, spike_count=int(r == 0))) for r in range(2)])
    assert sorted(kinds(e2)) == [("diverging", 0), ("hung", 0)], "no false recovered after the restart"
    assert e2.members["j/0"].state == "hung"
    store2.close()


def test_a_daemon_falling_behind_extends_the_dead_timeout_by_its_lag():
    clock = Clock()
    e = Engine(cfg(), clock=clock, wall=clock)
    # Sender clocks 100 s off: the offset is learned, not mistaken for lateness.
    run(e, clock, 3, lambda i: [e.heartbeat(hb(r, i + 1, sent_unix=clock.t + 100.0)) for r in range(2)])
    assert e.lag_s == 0.0
    # The daemon now applies rank 0's heartbeats 2.5 s late; rank 1's are stuck in the queue.
    run(e, clock, 4, lambda i: e.heartbeat(hb(0, 10 + i, sent_unix=clock.t + 100.0 - 2.5)))
    assert 2.4 < e.lag_s < 2.6 and kinds(e) == [], "3 s + 2.5 s of lag not yet spent"
    run(e, clock, 2, lambda i: e.heartbeat(hb(0, 20 + i, sent_unix=clock.t + 100.0 - 2.5)))
    assert kinds(e) == [("dead", 1)]
