"""The Ray actor that runs one training rank.

One actor per accelerator, placed by the supervisor's placement group. The actor sets the
rendezvous env (torchrun's variables) and the vendor's visible-devices variable itself,
then runs the ordinary Trainer: the same code path as `suanli train --nproc N`.
"""

from __future__ import annotations

import os
import socket
import traceback

import ray


@ray.remote(max_restarts=0, max_task_retries=0)
class RankWorker:
    """Remote methods are called by the supervisor; a SIGKILL of this process surfaces there
    as an ActorDiedError, an exception in training code as a RayTaskError."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()

    def reserve_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, cfg_toml: str, env: dict[str, str]) -> dict:
        os.environ.update(env)
        import tempfile

        from suanli.infra.config import load_config
        from suanli.infra.distributed import shutdown
        from suanli.infra.faults import FaultInjector, faults_from_env
        from suanli.infra.trainer import Trainer

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(cfg_toml)
        cfg = load_config(f.name)
        os.unlink(f.name)
        trainer = Trainer(cfg)
        try:
            # Faults first: a rank that dies or hangs at the end of a step never reports that
            # step, like a rank that fails inside it.
            FaultInjector(faults_from_env(), trainer.run_dir, trainer.ctx.rank).attach(trainer)
            _attach_health(trainer)
            results = trainer.fit()
            return {"rank": trainer.ctx.rank, "steps": trainer.step,
                    "final_loss": results[-1].loss if results else None}
        except Exception as e:
            # Keep the rank's own traceback: the supervisor shows it to a person.
            raise TrainingError(trainer.ctx.rank, "".join(traceback.format_exception(e))) from None
        finally:
            shutdown()


class TrainingError(RuntimeError):
    """An exception raised by training code on one rank (a user error: no restart)."""

    def __init__(self, rank: int, tb: str) -> None:
        super().__init__(f"rank {rank} raised:\n{tb}")
        self.rank = rank
        self.tb = tb

    def __reduce__(self):
        return (TrainingError, (self.rank, self.tb))


def _attach_health(trainer) -> None:
    """Report heartbeats to the daemon named in SUANLI_HEALTH_ADDR, when there is one."""
    addr = os.environ.get("SUANLI_HEALTH_ADDR")
    if not addr:
        return
    from suanli.fault.health.reporter import HeartbeatReporter

    HeartbeatReporter(addr, interval_s=trainer.cfg.fault.heartbeat_interval_s,
                      accelerator=trainer.acc).attach(trainer)
