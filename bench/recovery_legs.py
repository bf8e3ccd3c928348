"""The launcher side of `suanli bench recovery`: one suanli Trainer job started three ways.

Each leg runs in a process of its own (the benchmark kills its process group when it is
done or stuck), as `python -m suanli.bench.recovery_legs LAUNCHER SPEC.json`:

  suanli    Supervisor(cfg, workers, faults).run(): the embedded local Ray cluster with
            the health daemon; its summary is written to <run_dir>/leg.json
  torchrun  not launched from here: torchrun runs `... -m suanli.bench.recovery_legs rank
            CFG.toml` once per rank and restarts the whole group after a failure
  raytrain  Ray Train's TorchTrainer with FailureConfig(max_failures); a controller-side
            callback logs when Ray Train acts on a worker failure

In every leg each rank runs the same code: the ordinary Trainer with the fault injector
attached, resuming from the newest checkpoint in the shared run directory (the Trainer
does that itself, so no launcher needs its own checkpoint plumbing), and appends one line
to <run_dir>/launches.jsonl when its process starts (the restarts, seen from inside).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

LAUNCHES = "launches.jsonl"
RAY_DETECTIONS = "raytrain-failures.jsonl"


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def load_cfg(cfg_toml: str):
    from suanli.infra.config import loads_config

    return loads_config(cfg_toml, "the benchmark's config")


def train_rank(cfg_toml: str, launcher: str) -> dict:
    """One rank of the job, under any launcher: the rendezvous env (or a process group the
    launcher already made) comes from outside; faults come from SUANLI_INJECT_FAULTS."""
    from suanli.infra.faults import FaultInjector, faults_from_env
    from suanli.infra.trainer import Trainer

    cfg = load_cfg(cfg_toml)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _append(run_dir / LAUNCHES, {"time": time.time(), "launcher": launcher, "pid": os.getpid(),
                                 "rank": int(os.environ.get("RANK", "0")),
                                 "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")})
    trainer = Trainer(cfg)
    FaultInjector(faults_from_env(), trainer.run_dir, trainer.ctx.rank).attach(trainer)
    results = trainer.fit()
    return {"rank": trainer.ctx.rank, "steps": trainer.step, "final_loss": results[-1].loss if results else None}


# ---- torchrun ----
def _torchrun_rank(cfg_path: str) -> None:
    from suanli.infra.distributed import shutdown

    try:
        train_rank(Path(cfg_path).read_text(), "torchrun")
    finally:
        shutdown()


# ---- suanli ----
def run_suanli(spec: dict) -> dict:
    from suanli.infra.cluster.supervisor import JobFailed, Supervisor

    cfg = load_cfg(spec["cfg_toml"])
    try:
        summary = Supervisor(cfg, workers=spec["workers"], faults=[spec["fault"]]).run()
        return {"finished": summary.get("steps") == cfg.train.steps, "summary": summary}
    except JobFailed as e:
        return {"finished": False, "error": str(e)[-2000:]}
    finally:
        import ray

        ray.shutdown()


# ---- Ray Train ----
def ray_train_loop(config: dict) -> None:
    """train_loop_per_worker: TorchTrainer has already made the process group (and set RANK,
    WORLD_SIZE, LOCAL_RANK); suanli's init joins it instead of making a second one."""
    import torch

    os.environ.update(config["env"])
    # torch read OMP_NUM_THREADS when Ray's worker imported it; give it the same threads as the other legs
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train_rank(config["cfg_toml"], "raytrain")


def _failure_logger(run_dir: Path):
    from ray.train import UserCallback

    class FailureLog(UserCallback):
        """Runs in Ray Train's controller: the moment it sees a worker failure is the moment
        it starts to act on it (tear down the worker group, then restart or give up)."""

        def after_exception(self, run_context, worker_exceptions) -> None:
            _append(run_dir / RAY_DETECTIONS, {"time": time.time(), "ranks": sorted(worker_exceptions),
                                               "errors": [type(e).__name__ for e in worker_exceptions.values()]})

    return FailureLog()


def run_ray_train(spec: dict) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from suanli.backends import get_accelerator
    from suanli.infra.distributed import _backend_string

    run_dir = Path(spec["run_dir"])
    acc = get_accelerator()
    # The same local cluster the supervisor starts: loopback only, one slot per worker.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=max(spec["workers"], os.cpu_count() or 1), include_dashboard=False,
             logging_level="ERROR")
    env = {k: v for k, v in os.environ.items() if k.startswith("SUANLI_") or k == "OMP_NUM_THREADS"}
    env["SUANLI_INJECT_FAULTS"] = spec["fault"]
    try:
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"cfg_toml": spec["cfg_toml"], "env": env},
            # suanli's own backend string (gloo for CPU tensors beside the device's library),
            # so the Trainer's CPU-side collectives work on accelerators too; the timeout is
            # Ray Train's default, what a user gets.
            torch_config=TorchConfig(backend=_backend_string(acc)),
            scaling_config=ScalingConfig(num_workers=spec["workers"], use_gpu=acc.ray_resource == "GPU"),
            run_config=RunConfig(name="recovery", storage_path=str(run_dir / "ray-storage"),
                                 failure_config=FailureConfig(max_failures=spec["max_restarts"]),
                                 callbacks=[_failure_logger(run_dir)]),
        )
        trainer.fit()
        return {"finished": True}
    except Exception as e:  # TrainingFailedError once max_failures is spent
        return {"finished": False, "error": f"{type(e).__name__}: {e}"[-2000:]}
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    launcher, arg = argv[0], argv[1]
    if launcher == "rank":
        _torchrun_rank(arg)
        return 0
    spec = json.loads(Path(arg).read_text())
    result = {"suanli": run_suanli, "raytrain": run_ray_train}[launcher](spec)
    (Path(spec["run_dir"]) / "leg.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
