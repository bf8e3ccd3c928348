"""One training rank under the supervisor: the process the zygote forks for each attempt.

It runs the ordinary Trainer (the same code path as `suanli train --nproc N`) and leaves
its outcome in a small JSON file for the actor: the result, or the traceback together with
whether the error is a broken collective. That distinction matters to the supervisor: when
one rank dies, its peers fail in their next collective with an error that looks like a
crash in training code, and a restart must not be refused as a "user exception" because of
it.
"""

from __future__ import annotations

import json
import os
import traceback

import torch
import torch.distributed as dist

# Imported here so the zygote pays for them once, not every attempt.
from suanli.fault.guard import GuardError
from suanli.infra.config import loads_config
from suanli.infra.distributed import shutdown
from suanli.infra.faults import FaultInjector, faults_from_env
from suanli.infra.trainer import Trainer

# What collective libraries say when a peer went away or stopped answering (gloo's TCP
# transport, torch's store, NCCL/HCCL/CNCL/MCCL aborts). Not user errors: the peer is the cause.
COMM_FAILURE_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe",
                        "Connection refused", "NCCL", "HCCL", "CNCL", "MCCL", "RCCL", "timed out", "Timed out",
                        "TCPStore")


def is_comm_failure(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, RuntimeError) and any(m in text for m in COMM_FAILURE_MARKERS)


def run_rank(cfg_toml: str, env: dict[str, str], result_path: str) -> int:
    """Train this rank to the end; 0 on success, 1 with the traceback in `result_path`."""
    os.environ.update(env)
    _log_to_file(env.get("SUANLI_RANK_LOG"))
    # The intra-op pool is sized when first used, which is after the fork: size it for this rank.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    rank = int(env.get("RANK", "0"))
    try:
        trainer = Trainer(loads_config(cfg_toml, "the supervisor's config"))
        rank = trainer.ctx.rank
        # Faults first: a rank that dies or hangs at the end of a step never reports that
        # step, like a rank that fails inside it.
        FaultInjector(faults_from_env(), trainer.run_dir, rank).attach(trainer)
        _attach_health(trainer)
        results = trainer.fit()
        outcome = {"rank": rank, "steps": trainer.step, "final_loss": results[-1].loss if results else None}
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure is reported, the process ends anyway
        outcome = {"rank": rank, "error": "".join(traceback.format_exception(e)), "comm_failure": is_comm_failure(e),
                   "diverging": isinstance(e, GuardError)}
        code = 1
    finally:
        try:
            shutdown()
        except Exception:
            pass
    with open(result_path + ".tmp", "w") as f:
        json.dump(outcome, f)
    os.replace(result_path + ".tmp", result_path)
    return code


def _log_to_file(path: str | None) -> None:
    """Send this process's stdout and stderr (Python's and native code's) to the rank's log."""
    if not path:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for std in (1, 2):
        os.dup2(fd, std)
    os.close(fd)
    print(f"== rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}, pid {os.getpid()}, "
          f"job {os.environ.get('SUANLI_JOB', '')} ==", flush=True)


def _attach_health(trainer) -> None:
    """Report heartbeats to the daemon named in SUANLI_HEALTH_ADDR, when there is one."""
    addr = os.environ.get("SUANLI_HEALTH_ADDR")
    if not addr:
        return
    from suanli.fault.health.reporter import HeartbeatReporter

    HeartbeatReporter(addr, interval_s=trainer.cfg.fault.heartbeat_interval_s,
                      accelerator=trainer.acc).attach(trainer)
