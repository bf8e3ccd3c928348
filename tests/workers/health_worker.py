"""A training-like process for the health daemon tests: one or more ranks, each with its own
HeartbeatReporter, stepping at a set pace.

  steps mode: each hosted rank steps in its own thread (`--ranks 0,1,2`), `--slow R:SECONDS`
              makes one slower, `--spike R:STEP` flags a loss spike; all finish cleanly
              (phase done) after `--seconds` or on SIGTERM.
  gloo mode:  one rank per process (RANK/WORLD_SIZE env); every step is a real gloo
              all_reduce; `--hang-rank R --hang-after N` makes rank R sleep inside
              `hang_forever` at step N, so its peers block in all_reduce.
  idle mode:  one reporter, main thread idle; prints the process CPU spent per heartbeat.
Prints `HW {json}` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

from suanli.fault.health.reporter import HeartbeatReporter, count_collectives_for


STOP = threading.Event()


def say(**kv) -> None:
    print("HW " + json.dumps(kv), flush=True)


def hang_forever() -> None:
    time.sleep(3600)


def run_rank(args, rank: int, step_time: float, spike_at: int | None) -> None:
    rep = HeartbeatReporter(args.addr, job=args.job, rank=rank, world_size=args.world_size, run_dir=args.run_dir,
                            interval_s=args.interval).start()
    deadline = time.monotonic() + args.seconds
    step = 0
    while time.monotonic() < deadline and not STOP.is_set():
        rep.update(phase="forward")
        time.sleep(step_time)
        rep.collective_issued()
        step += 1
        rep.update(step=step, phase="optimizer", loss=2.0 / step, step_time_s=step_time, tokens_per_s=1000 / step_time)
        if spike_at == step:
            rep.flag_divergence("spike")
    rep.stop(done=True)
    say(rank=rank, steps=step, connects=rep.connects, sent=rep.sent)


def steps_mode(args) -> None:
    ranks = [int(r) for r in args.ranks.split(",")]
    slow = dict((int(a), float(b)) for a, b in (s.split(":") for s in args.slow))
    spikes = dict((int(a), int(b)) for a, b in (s.split(":") for s in args.spike))
    threads = [threading.Thread(target=run_rank, args=(args, r, slow.get(r, args.step_time), spikes.get(r)))
               for r in ranks]
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    for t in threads:
        t.start()
    say(started=ranks, pid=os.getpid())
    for t in threads:
        t.join()


def gloo_mode(args) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    rep = HeartbeatReporter(args.addr, job=args.job, rank=rank, world_size=world, run_dir=args.run_dir,
                            interval_s=args.interval).start()
    count_collectives_for(rep)
    say(rank=rank, pid=os.getpid(), started=True)
    t = torch.ones(4)
    for step in range(1, 100_000):
        rep.update(phase="forward")
        time.sleep(args.step_time)
        if rank == args.hang_rank and step == args.hang_after:
            hang_forever()
        rep.update(phase="backward")
        dist.all_reduce(t)
        rep.update(step=step, phase="optimizer", loss=1.0, step_time_s=args.step_time)


def idle_mode(args) -> None:
    import psutil

    rep = HeartbeatReporter(args.addr, job=args.job, rank=0, run_dir=args.run_dir, interval_s=args.interval).start()
    while not rep.connected:
        time.sleep(0.05)
    proc = psutil.Process()
    c0, sent0 = proc.cpu_times(), rep.sent
    time.sleep(args.seconds)
    c1, sent1 = proc.cpu_times(), rep.sent
    rep.stop(done=True)
    say(cpu_s=(c1.user + c1.system) - (c0.user + c0.system), heartbeats=sent1 - sent0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["steps", "gloo", "idle"])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--ranks", default="0")
    ap.add_argument("--world-size", type=int, default=0)
    ap.add_argument("--step-time", type=float, default=0.1)
    ap.add_argument("--slow", action="append", default=[])
    ap.add_argument("--spike", action="append", default=[])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--hang-rank", type=int, default=-1)
    ap.add_argument("--hang-after", type=int, default=10)
    a = ap.parse_args()
    {"steps": steps_mode, "gloo": gloo_mode, "idle": idle_mode}[a.mode](a)
