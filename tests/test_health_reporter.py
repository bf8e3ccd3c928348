"""HeartbeatReporter: trainer hooks, collective counting, stack dumps from its own thread,
connecting to a daemon that starts late, and its cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from suanli.fault.health import DetectorConfig, HealthClient, HeartbeatReporter, start_daemon
from suanli.fault.health.stacks import dump_stacks
from conftest import wait_for
from suanli.infra.launch import free_port
from suanli.infra.trainer import Hooks, StepResult

WORKER = Path(__file__).parent / "workers" / "health_worker.py"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    h = start_daemon("127.0.0.1:0", str(tmp_path_factory.mktemp("rep") / "h.db"),
                     detectors=DetectorConfig(interval_s=0.2, tick_s=0.1))
    yield h
    h.stop()


def test_attach_to_trainer_hooks_counts_collectives_and_finishes_done(daemon, tmp_path):
    trainer = SimpleNamespace(hooks=Hooks(), run_dir=tmp_path, ctx=SimpleNamespace(rank=3, world_size=4))
    original = dist.all_reduce
    rep = HeartbeatReporter(daemon.address, job="attach", interval_s=0.1).attach(trainer)
    assert (rep.rank, rep.world_size, rep.run_dir) == (3, 4, str(tmp_path))
    assert len(trainer.hooks.on_phase) == len(trainer.hooks.on_step_end) == len(trainer.hooks.on_fit_end) == 1
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        for step in (1, 2):
            for phase in ("data", "forward", "backward", "optimizer"):
                trainer.hooks.on_phase[0](trainer, phase)
            dist.all_reduce(torch.ones(2))
            trainer.hooks.on_step_end[0](trainer, StepResult(step, 2.5, 1.0, 1e-3, 0.05, 1234.0, None))
    finally:
        dist.destroy_process_group()
    assert rep.collectives == 2
    client = HealthClient(daemon.address)
    m = wait_for(lambda: [m for m in client.status("attach").members if m.step == 2], 10, "step 2")[0]
    assert (m.rank, m.collectives, m.loss, m.step_time_s) == (3, 2, 2.5, 0.05)
    trainer.hooks.on_fit_end[0](trainer)
    assert dist.all_reduce is original, "the collective wrappers are removed at the end"
    assert [m.state for m in client.status("attach").members] == ["done"]


def test_update_rejects_unknown_phase_and_derives_step_time():
    rep = HeartbeatReporter("127.0.0.1:1", job="x")
    with pytest.raises(ValueError, match="phase='warmup'"):
        rep.update(phase="warmup")
    rep.update(step=1)
    time.sleep(0.05)
    rep.update(step=3)
    assert 0.02 <= rep.step_time_s <= 0.5
    rep.update(loss=float("nan"))
    assert rep.nan_count == 1


def test_stack_dump_shows_every_thread(tmp_path):
    gate = threading.Event()

    def blocked_in_collective_like_wait():
        gate.wait(30)

    t = threading.Thread(target=blocked_in_collective_like_wait, name="trainer-main")
    t.start()
    try:
        path = dump_stacks(tmp_path, 5, "test")
    finally:
        gate.set()
        t.join()
    assert path.parent == tmp_path / "stacks" and path.name.startswith("rank5-")
    text = path.read_text()
    assert "## thread trainer-main" in text and "blocked_in_collective_like_wait" in text and "test" in text


def test_reporter_started_before_the_daemon_connects_when_it_appears(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    rep = HeartbeatReporter(addr, job="late", rank=0, interval_s=0.1).start()
    time.sleep(1.0)
    assert not rep.connected
    with start_daemon(addr, str(tmp_path / "h.db"), detectors=DetectorConfig(interval_s=0.1)) as h:
        wait_for(lambda: rep.connected, 5, "the reporter to connect")
        rep.stop()
        assert [m.state for m in HealthClient(h.address).status("late").members] == ["done"]


def test_cost_is_far_below_one_percent(daemon, tmp_path):
    # Training-thread side: a step's worth of hook calls (4 phases + step end).
    rep = HeartbeatReporter(daemon.address, job="cost")
    trainer = SimpleNamespace(hooks=Hooks(), run_dir=tmp_path)
    res = StepResult(1, 1.0, 1.0, 1e-3, 0.1, 1.0, None)
    n = 20_000
    t0 = time.perf_counter()
    for i in range(n):
        for phase in ("data", "forward", "backward", "optimizer"):
            rep._on_phase(trainer, phase)
        rep._on_step_end(trainer, res)
    per_step_us = (time.perf_counter() - t0) / n * 1e6
    assert per_step_us < 100, f"{per_step_us:.1f} us per step in hooks"   # 0.1% of a 100 ms step
    # Background side: the whole process's CPU per heartbeat (reporter thread + gRPC's).
    out = subprocess.run([sys.executable, str(WORKER), "idle", "--addr", daemon.address, "--job", "cost",
                          "--run-dir", str(tmp_path), "--interval", "0.05", "--seconds", "2"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(next(l[3:] for l in out.stdout.splitlines() if l.startswith("HW {")))
    per_beat_ms = r["cpu_s"] / r["heartbeats"] * 1e3
    print(f"hooks {per_step_us:.1f} us/step, {per_beat_ms:.2f} ms CPU per heartbeat over {r['heartbeats']} heartbeats")
    # At the default 1 s interval, under 10 ms per heartbeat is under 1% of any step.
    assert per_beat_ms < 10, r
