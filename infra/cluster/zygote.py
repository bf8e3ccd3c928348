"""A pre-imported process that forks training ranks on request (a "zygote").

A rank started from nothing pays for an interpreter, `import torch` and the suanli stack
before its first step: seconds on an idle host, tens of seconds on a loaded one, and it is
paid again on every restart. Each Ray actor starts one zygote when it is created; the zygote
pays the imports once, in the background, and every attempt after that is a fork
(milliseconds). The zygote stays single-threaded and never touches a device, a thread pool
or a gRPC channel, so nothing unsafe to fork is ever inherited; each child initializes its
device and process group itself.

Lifetimes are chained so nothing outlives the actor: the zygote dies with the actor and a
rank dies with the zygote (Linux parent-death signal), and the zygote also exits when its
control socket closes.

Protocol on the control socket, one JSON object per line:
    -> {"cmd": "run", "cfg": TOML text, "env": {...}, "result": path}
    <- {"pid": N}            the rank's process started
    <- {"exit": code}        it ended (negative: killed by that signal)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(fd: int) -> None:
    _die_with_parent()
    # The imports every attempt would otherwise pay; nothing here starts a thread.
    from suanli.infra.cluster import rank_process

    sock = socket.socket(fileno=fd)
    requests, replies = sock.makefile("r"), sock.makefile("w")
    for line in requests:
        req = json.loads(line)
        if req.get("cmd") != "run":
            continue
        pid = os.fork()
        if pid == 0:
            requests.close(), replies.close(), sock.close()
            _die_with_parent()
            code = 1
            try:
                code = rank_process.run_rank(req["cfg"], req["env"], req["result"])
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class Zygote:
    """The actor's side: start the zygote now, run one rank at a time on it later."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "suanli.infra.cluster.zygote", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()])
        theirs.close()
        self._sock = ours
        self._requests, self._replies = ours.makefile("w"), ours.makefile("r")
        self._lock = threading.Lock()
        self.pid: int | None = None      # the running rank's process, if any

    def run(self, cfg_toml: str, env: dict[str, str], result_path: str) -> int:
        """Fork a rank and wait for it; its exit code (negative: the signal that killed it)."""
        with self._lock:
            self._requests.write(json.dumps({"cmd": "run", "cfg": cfg_toml, "env": env, "result": result_path}) + "\n")
            self._requests.flush()
            self.pid = self._read()["pid"]
            try:
                return self._read()["exit"]
            finally:
                self.pid = None

    def kill_rank(self) -> None:
        """SIGKILL the running rank (it may be blocked in a collective that never returns)."""
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Kill the running rank, if any, and wait until the zygote has reaped it."""
        self.kill_rank()
        with self._lock:
            pass

    def _read(self) -> dict:
        line = self._replies.readline()
        if not line:
            raise RuntimeError(f"the rank zygote (pid {self._proc.pid}) exited with {self._proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.kill_rank()
        self._sock.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()


if __name__ == "__main__":
    main(int(sys.argv[1]))
