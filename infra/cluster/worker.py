"""The Ray actor that holds one training rank's place in the gang.

One actor per accelerator, placed by the supervisor's placement group. The actor outlives
attempts: it starts a zygote (infra/cluster/zygote.py) when created, and each attempt of
the job is a fork of it, with the rendezvous env (torchrun's variables) and the vendor's
visible-devices variable set by the supervisor. A restart after a rank's process dies or
hangs therefore reuses the gang: no new actors, no interpreter start, no `import torch`.

How failures surface at the supervisor:
  the rank's process was killed (SIGKILL, OOM killer)  -> RankProcessDied (a task error)
  an exception in training code                        -> TrainingError, .comm_failure set
                                                          when it is a broken collective,
                                                          .diverging when the loss guard gave up
  the actor itself (or its node) died                  -> Ray's ActorDiedError
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile

import ray

from suanli.infra.cluster.zygote import Zygote


@ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=4)
class RankWorker:
    """`run` blocks for an attempt; `stop` (from another call) ends it. Threaded, so both
    can be in flight at once."""

    def __init__(self) -> None:
        self._zygote = Zygote()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()

    def reserve_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, cfg_toml: str, env: dict[str, str]) -> dict:
        fd, result_path = tempfile.mkstemp(prefix="suanli-rank-", suffix=".json")
        os.close(fd)
        os.unlink(result_path)
        rank = int(env.get("RANK", "0"))
        try:
            code = self._zygote.run(cfg_toml, env, result_path)
            outcome = json.loads(open(result_path).read()) if os.path.exists(result_path) else {}
        finally:
            for p in (result_path, result_path + ".tmp"):
                if os.path.exists(p):
                    os.unlink(p)
        if code == 0:
            return outcome
        if "error" in outcome:
            raise TrainingError(outcome.get("rank", rank), outcome["error"], outcome.get("comm_failure", False),
                                outcome.get("diverging", False))
        raise RankProcessDied(rank, code)

    def stop(self) -> None:
        """End the running attempt, if any (SIGKILL: it may be stuck in a collective)."""
        self._zygote.stop()

    def close(self) -> None:
        self._zygote.close()


class TrainingError(RuntimeError):
    """An exception raised by training code on one rank. `comm_failure`: it is a broken
    collective, i.e. most likely the consequence of a failure elsewhere; `diverging`: the
    loss guard ran out of rollbacks."""

    def __init__(self, rank: int, tb: str, comm_failure: bool = False, diverging: bool = False) -> None:
        super().__init__(f"rank {rank} raised:\n{tb}")
        self.rank, self.tb, self.comm_failure, self.diverging = rank, tb, comm_failure, diverging

    def __reduce__(self):
        return (TrainingError, (self.rank, self.tb, self.comm_failure, self.diverging))


class RankProcessDied(RuntimeError):
    """The rank's process ended without a word: killed by a signal or a hard exit."""

    def __init__(self, rank: int, exit_code: int) -> None:
        how = f"killed by {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exited with code {exit_code}"
        super().__init__(f"rank {rank}'s process {how}")
        self.rank, self.exit_code = rank, exit_code

    def __reduce__(self):
        return (RankProcessDied, (self.rank, self.exit_code))
