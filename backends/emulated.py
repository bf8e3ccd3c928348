"""A second device type for testing heterogeneous jobs on one CPU machine.

"cpu-emulated" is the CPU backend under another name: its ranks form their own device
group with their own process groups, so a laptop can run the whole cross-vendor path
(separate collective groups, the host-staged bridge, load balancing) that a job spanning
NVIDIA and Ascend cards runs. It is a test accelerator: it is not in BACKENDS or
PROBE_ORDER, so `get_accelerator()` never picks it; `register()` adds it by name only.

Slowing it down honestly: `SUANLI_EMULATED_SLOWDOWN=f` (f >= 1) makes every span of
compute that a caller wraps in `compute_span()` take f times as long, by sleeping (f - 1)
times the span's wall time after it. The work itself is real and the sleep holds the rank
exactly as a slower device would (its peers wait for it); measured in wall time, so the
device stays f times slower than an unslowed rank on the same host however loaded the host
is. The sleep uses no core, so the emulated device does not steal time from the others.
Communication outside the span is not slowed.

For speed measurements, `busy_extra_s` adds up (f - 1) times each span's *CPU* time: what
a device f times slower would have spent busy. A CPU "device" is best timed by CPU time
(its wall time swings with other processes' load); see infra/hetero/balance.busy_clock.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

from .cpu import CPUAccelerator

NAME = "cpu-emulated"
SLOWDOWN_ENV = "SUANLI_EMULATED_SLOWDOWN"


def slowdown_from_env(environ: dict | None = None) -> float:
    raw = (environ if environ is not None else os.environ).get(SLOWDOWN_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SLOWDOWN_ENV}={raw!r}: expected a number >= 1 (e.g. 2 for half speed)") from None
    if value < 1.0:
        raise ValueError(f"{SLOWDOWN_ENV}={raw!r}: must be >= 1 (1 = full CPU speed, 2 = half speed)")
    return value


class EmulatedAccelerator(CPUAccelerator):
    name = NAME
    install_hint = "a test accelerator: call suanli.backends.emulated.register() (or set hetero.emulated = true)"

    def __init__(self, slowdown: float | None = None) -> None:
        super().__init__()
        self.slowdown = slowdown_from_env() if slowdown is None else float(slowdown)
        if self.slowdown < 1.0:
            raise ValueError(f"EmulatedAccelerator: slowdown must be >= 1, got {self.slowdown}")
        self.slept_s = 0.0       # wall time added so far, so reports can show it
        self.busy_extra_s = 0.0  # CPU-time equivalent of the slowdown so far (see module doc)

    def device_name(self, index: int = 0) -> str:
        return f"emulated x{self.slowdown:g} on {super().device_name(index)}"

    @contextlib.contextmanager
    def compute_span(self) -> Iterator[None]:
        """Wrap one span of device work; it then takes `slowdown` times as long."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        if self.slowdown > 1.0:
            extra = (self.slowdown - 1.0) * (time.perf_counter() - wall)
            self.busy_extra_s += (self.slowdown - 1.0) * (time.process_time() - cpu)
            time.sleep(extra)
            self.slept_s += extra

    def __repr__(self) -> str:
        return f"<Accelerator {self.name} slowdown={self.slowdown:g} comm={self.comm_backend}>"


def register() -> None:
    """Make "cpu-emulated" selectable by name (never by probing)."""
    from . import register_backend

    register_backend(NAME, "suanli.backends.emulated:EmulatedAccelerator")


__all__ = ["EmulatedAccelerator", "register", "NAME", "SLOWDOWN_ENV", "slowdown_from_env"]
