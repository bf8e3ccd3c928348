"""Fault injection for demos, tests and benchmarks: `--inject-fault SPEC`.

    kill:rank=1:step=30        SIGKILL the rank's process after step 30
    hang:rank=0:step=50        the rank blocks in a point-to-point receive nobody answers;
                               its peers block in their next collective (a real hang)
    nan:step=40[:rank=0]       gradients become NaN during step 40 (the spike guard's case)
    slow:rank=1:factor=3       the rank's steps take `factor` times as long (a straggler)
    raise:rank=0:step=20       the training code raises (a user error: no restart)

Each one-shot fault leaves a marker in <run_dir>/faults/ before it fires, so a job resumed
from an earlier checkpoint does not hit the same fault again.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# kind -> (required keys, optional keys with defaults)
KINDS: dict[str, tuple[tuple[str, ...], dict[str, float]]] = {
    "kill": (("rank", "step"), {}),
    "hang": (("rank", "step"), {}),
    "nan": (("step",), {"rank": -1}),
    "slow": (("rank", "factor"), {"step": 0}),
    "raise": (("rank", "step"), {}),
}


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    rank: int            # -1: every rank
    step: int
    factor: float = 1.0

    @property
    def marker(self) -> str:
        return f"{self.kind}-rank{self.rank}-step{self.step}"

    def __str__(self) -> str:
        extra = f":factor={self.factor:g}" if self.kind == "slow" else ""
        return f"{self.kind}:rank={self.rank}:step={self.step}{extra}"


def parse_fault(spec: str) -> FaultSpec:
    kind, *parts = spec.strip().split(":")
    if kind not in KINDS:
        raise ValueError(f"--inject-fault {spec!r}: unknown kind '{kind}'; choose one of {', '.join(KINDS)}")
    required, optional = KINDS[kind]
    values: dict[str, float] = dict(optional)
    for part in parts:
        if "=" not in part:
            raise ValueError(f"--inject-fault {spec!r}: '{part}' should be key=value, e.g. kill:rank=1:step=30")
        k, v = part.split("=", 1)
        if k not in required and k not in optional:
            raise ValueError(f"--inject-fault {spec!r}: '{k}' is not a key of '{kind}' "
                             f"(keys: {', '.join(required + tuple(optional))})")
        try:
            values[k] = float(v)
        except ValueError:
            raise ValueError(f"--inject-fault {spec!r}: {k}={v!r} is not a number") from None
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"--inject-fault {spec!r}: missing {', '.join(missing)} (e.g. {kind}:"
                         + ":".join(f"{k}=1" for k in required) + ")")
    return FaultSpec(kind, int(values.get("rank", -1)), int(values.get("step", 0)), float(values.get("factor", 1.0)))


class FaultInjector:
    """Registers trainer hooks that fire the given faults on the matching rank and step."""

    def __init__(self, specs: list[FaultSpec], run_dir: Path, rank: int) -> None:
        self.specs = [s for s in specs if s.rank in (-1, rank)]
        self.dir = Path(run_dir) / "faults"
        self.rank = rank

    def attach(self, trainer) -> "FaultInjector":
        trainer.hooks.on_phase.append(self._on_phase)
        trainer.hooks.on_step_end.append(self._on_step_end)
        return self

    def _claim(self, spec: FaultSpec) -> bool:
        """True once per fault per run directory (the marker survives restarts)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.dir / f"{spec.marker}-r{self.rank}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, f"{time.time()}\n".encode())
        os.fsync(fd)
        os.close(fd)
        return True

    def _on_phase(self, trainer, phase: str) -> None:
        # NaN is injected between backward and the optimizer: the guard must catch it
        # before (or right after) it reaches the weights.
        if phase != "optimizer":
            return
        for s in self.specs:
            if s.kind == "nan" and trainer.step + 1 == s.step and self._claim(s):
                for p in trainer.params:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
                        break

    def _on_step_end(self, trainer, result) -> None:
        for s in self.specs:
            if s.kind == "slow" and result.step >= s.step:
                time.sleep((s.factor - 1.0) * result.step_time_s)
            elif result.step == s.step and s.kind in ("kill", "hang", "raise") and self._claim(s):
                getattr(self, f"_fire_{s.kind}")(s, trainer)

    def _fire_kill(self, s: FaultSpec, trainer) -> None:
        print(f"[fault] rank {self.rank}: SIGKILL after step {s.step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def _fire_raise(self, s: FaultSpec, trainer) -> None:
        raise RuntimeError(f"injected fault: raise on rank {self.rank} after step {s.step}")

    def _fire_hang(self, s: FaultSpec, trainer) -> None:
        print(f"[fault] rank {self.rank}: hanging after step {s.step}", flush=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A receive that no peer will ever match: this rank sits inside the collective
            # library, exactly like a rank waiting on a lost peer.
            peer = (dist.get_rank() + 1) % dist.get_world_size()
            dist.recv(torch.zeros(1), src=peer, tag=424242)
        while True:
            time.sleep(3600)


def faults_from_env() -> list[FaultSpec]:
    raw = os.environ.get("SUANLI_INJECT_FAULTS", "")
    return [parse_fault(s) for s in raw.split(",") if s.strip()]
