"""Start N local processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and fail fast: when one rank exits non-zero the others are
stopped at once instead of waiting in a collective for the backend's timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1",
             local_rank: int | None = None, extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank if local_rank is None else local_rank), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        # Each rank on a shared CPU gets its share of cores; oversubscription makes gloo crawl.
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // world_size)),
        "PYTHONUNBUFFERED": "1",
        # A rank that dies inside native code (gloo, a vendor runtime) then still leaves its
        # Python stack in its output instead of vanishing silently.
        "PYTHONFAULTHANDLER": "1",
    })
    env.update(extra or {})
    return env


@dataclass
class LaunchResult:
    returncode: int            # 0, or the failing rank's code (negative: killed by that signal)
    failed_rank: int | None    # the rank that failed first; a signal death outranks a peer's error
    outputs: list[str]         # captured output per rank (when capture=True)

    def describe(self) -> str:
        """One line naming the failure's cause, e.g. "rank 1 was killed by SIGSEGV"."""
        if self.returncode == 0:
            return "all ranks exited 0"
        if self.failed_rank is None:
            return f"timed out (code {self.returncode})"
        if self.returncode < 0:
            return f"rank {self.failed_rank} was killed by {signal.Signals(-self.returncode).name}"
        return f"rank {self.failed_rank} exited with code {self.returncode}"


def launch_local(cmd: list[str], nproc: int, capture: bool = False, timeout_s: float | None = None,
                 extra_env: dict | None = None, echo_rank: int | None = 0) -> LaunchResult:
    """Run `cmd` as `nproc` ranks on this machine.

    capture: keep each rank's output (tests read it); otherwise rank `echo_rank`'s output
    is passed through and the others' is prefixed with their rank.
    """
    port = free_port()
    procs: list[subprocess.Popen] = []
    outputs: list[list[str]] = [[] for _ in range(nproc)]
    threads = []
    for r in range(nproc):
        p = subprocess.Popen(cmd, env=rank_env(r, nproc, port, extra=extra_env), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        procs.append(p)

        def pump(r: int = r, p: subprocess.Popen = p) -> None:
            for line in p.stdout:  # type: ignore[union-attr]
                outputs[r].append(line)
                if not capture:
                    sys.stdout.write(line if r == echo_rank else f"[rank{r}] {line}")
                    sys.stdout.flush()

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        threads.append(t)

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed_rank, code = None, 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                # When a rank dies by a signal its peers fail in their next collective; if both
                # are seen in one poll, the signal death is the cause worth reporting.
                failed_rank, code = min(bad, key=lambda rc: (rc[1] > 0, rc[0]))
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                failed_rank, code = -1, 124
                break
            time.sleep(0.05)
    finally:
        terminate_all(procs)
        for t in threads:
            t.join(timeout=5)
        for t, p in zip(threads, procs):
            if not t.is_alive() and p.stdout is not None:
                p.stdout.close()
    if failed_rank == -1:
        failed_rank = None
    return LaunchResult(code, failed_rank, ["".join(o) for o in outputs])


def terminate_all(procs: list[subprocess.Popen], grace_s: float = 3.0) -> None:
    """SIGTERM every live process group, then SIGKILL what is left after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
