"""Crash consistency: SIGKILL a saving process at random moments and at every commit step,
then check that resume picks a valid checkpoint — never a torn one — and never loses one
that was already committed.

One process imports torch once; each trial forks a child that resumes from the directory
(as a restarted job would) and keeps saving checkpoints whose every tensor holds the step
number, until it is killed (by the parent at a random time, or by itself at a named commit
point via SUANLI_CKPT_CRASH_AT). The parent then runs resume's logic and loads the pick:
every tensor must equal its step. Prints `RESULT {json}`.
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from suanli.fault.checkpoint import Checkpointer, TrainState
from suanli.fault.checkpoint.checkpointer import CRASH_ENV
from suanli.fault.checkpoint.manifest import scan

CRASH_POINTS = ["before_manifest", "before_rename", "after_rename", "after_latest", "mid_retention"]


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = s["value"]


def build() -> TrainState:
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 256)).sum().backward()
    opt.step()
    opt.zero_grad()
    return TrainState([model], opt, {"counter": Counter()}, meta={"layout": {"world_size": 1}})


@torch.no_grad()
def fill(state: TrainState, value: float) -> None:
    for p in state.modules[0].parameters():
        p.fill_(value)
        for t in state.optimizer.state[p].values():
            if t.dim() > 0:
                t.fill_(value)
    state.stateful["counter"].value = int(value)


@torch.no_grad()
def holds(state: TrainState, value: float) -> bool:
    ok = state.stateful["counter"].value == value
    for p in state.modules[0].parameters():
        ok &= bool((p == value).all())
        for t in state.optimizer.state[p].values():
            ok &= bool((t == value).all()) if t.dim() > 0 else True
    return ok


def child(ckpt_dir: str) -> None:
    ck = Checkpointer(ckpt_dir, every_steps=1, keep_last=2)
    info = ck.latest_valid()
    state = build()
    start = info.step + 1 if info else 1
    for step in range(start, start + 8):
        fill(state, step)
        ck.save_async(step, state)
    ck.close()
    os._exit(0)


def main(ckpt_dir: str, trials: int) -> None:
    rng = random.Random(1234)
    plan = [p for p in CRASH_POINTS for _ in range(2)] + [None] * max(0, trials - 2 * len(CRASH_POINTS))
    rng.shuffle(plan)
    stats = {"trials": 0, "killed_mid_write": 0, "crash_points": {}, "resumed_steps": [], "errors": []}
    committed = 0   # newest step known committed: a crash must never lose it
    for point in plan:
        if point:
            os.environ[CRASH_ENV] = point
        else:
            os.environ.pop(CRASH_ENV, None)
        pid = os.fork()
        if pid == 0:
            child(ckpt_dir)
        if point is None:
            time.sleep(rng.uniform(0.02, 0.5))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        stats["trials"] += 1
        if point:
            stats["crash_points"][point] = stats["crash_points"].get(point, 0) + int(killed)
        if any(c.status == "uncommitted" for c in scan(Path(ckpt_dir))):
            stats["killed_mid_write"] += 1

        os.environ.pop(CRASH_ENV, None)
        ck = Checkpointer(ckpt_dir, every_steps=1, keep_last=2)
        info = ck.latest_valid()
        if info is None:
            if committed:
                stats["errors"].append(f"trial {stats['trials']}: lost committed step {committed}")
            continue
        if info.step < committed:
            stats["errors"].append(f"trial {stats['trials']}: resumed {info.step} < committed {committed}")
        state = build()
        loaded = ck.load(info.step, state)
        if loaded["step"] != info.step or not holds(state, info.step):
            stats["errors"].append(f"trial {stats['trials']}: step {info.step} loaded torn or mixed data")
        committed = max(committed, info.step)
        stats["resumed_steps"].append(info.step)
    print("RESULT " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]))
