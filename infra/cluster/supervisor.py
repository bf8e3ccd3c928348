"""The Ray supervisor: gang-launch one actor per accelerator, watch for failures, classify
them, and restart from the newest valid checkpoint until the job is done.

Failure classes and what they get (each with its own budget and backoff):
  worker_lost / node_lost  tear down the gang, restart on the capacity that is left
  hang                     (the health daemon already asked the suspects for stack dumps)
                           the same restart
  user_exception           stop at once with the rank's traceback: a restart loop would
                           only repeat the bug
  diverging                handled inside the job by the spike guard's rollback; counted here
Elastic: tp × pp is kept and the data-parallel degree follows the accelerators available;
the global batch is kept by gradient accumulation (the trainer derives it from dp).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from suanli.backends import get_accelerator
from suanli.infra.config import JobConfig, to_toml
from suanli.infra.cluster.worker import RankWorker


@dataclass
class RestartPolicy:
    max_restarts: int
    backoff_s: float


DEFAULT_POLICIES = {
    "worker_lost": RestartPolicy(5, 1.0),
    "node_lost": RestartPolicy(5, 2.0),
    "hang": RestartPolicy(3, 1.0),
    "user_exception": RestartPolicy(0, 0.0),
}


@dataclass
class Recovery:
    failure: str
    rank: int | None
    detail: str
    fault_time: float | None        # when the fault happened, where it can be known
    detected_time: float
    restarted_time: float | None = None
    first_step_time: float | None = None
    step_before: int = 0            # last step recorded before the failure
    resumed_from: int | None = None  # checkpoint step the restart resumed from
    world_size_after: int | None = None

    def as_summary(self) -> dict:
        d = {"failure": self.failure, "rank": self.rank, "detail": self.detail,
             "detection_s": None if self.fault_time is None else round(self.detected_time - self.fault_time, 3),
             "restart_s": None if self.first_step_time is None else round(self.first_step_time - self.detected_time, 3),
             "steps_lost": None if self.resumed_from is None else max(0, self.step_before - self.resumed_from),
             "resumed_from_step": self.resumed_from, "world_size_after": self.world_size_after}
        return d


class JobFailed(RuntimeError):
    pass


@dataclass
class Supervisor:
    cfg: JobConfig
    workers: int
    ray_address: str | None = None
    faults: list[str] = field(default_factory=list)
    health_addr: str | None = None        # a running daemon; None starts one
    policies: dict = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    poll_s: float = 0.2

    def __post_init__(self) -> None:
        self.run_dir = Path(self.cfg.train.run_dir)
        self.acc = get_accelerator()
        self.recoveries: list[Recovery] = []
        self.restarts: dict[str, int] = {k: 0 for k in self.policies}
        self._daemon = None
        self.job = "".join(c if c.isalnum() or c in "._-" else "-" for c in self.run_dir.name)[:128] or "job"
        from suanli.fault.proto import health_pb2

        self._hung_kind = health_pb2.EVENT_HUNG

    # ---- cluster ----
    def _connect(self) -> None:
        self._owns_ray = False
        if ray.is_initialized():
            return
        if self.ray_address:
            ray.init(address=self.ray_address, logging_level="ERROR")
        else:
            # The embedded default: a local cluster with one logical slot per worker, kept on
            # loopback. Ray otherwise swaps 127.0.0.1 for the machine's routable address; its
            # single-machine mode (the one it uses on macOS) does not.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
            resources = {} if self.acc.ray_resource in (None, "CPU", "GPU") else {self.acc.ray_resource: self.workers}
            # address="local": always a cluster of our own, never one some other job left running.
            self._owns_ray = True
            ray.init(address="local", num_cpus=max(self.workers, os.cpu_count() or 1), resources=resources or None,
                     include_dashboard=False, logging_level="ERROR")

    def _bundle(self) -> dict:
        res = self.acc.ray_resource or "CPU"
        return {"CPU": 1} if res == "CPU" else {"CPU": 1, res: 1}

    def capacity(self) -> int:
        """Accelerators the alive part of the cluster offers."""
        res = self.acc.ray_resource or "CPU"
        return int(sum(n["Resources"].get(res, 0) for n in ray.nodes() if n["Alive"]))

    def _world_size(self) -> int:
        p = self.cfg.parallel
        model_parallel = p.tp * p.pp * p.dp_replicate
        usable = min(self.workers, self.capacity())
        world = (usable // model_parallel) * model_parallel
        if world == 0:
            raise JobFailed(f"only {usable} accelerator(s) available but tp*pp*dp_replicate = {model_parallel}; "
                            f"the job cannot run on this cluster")
        # the data-parallel degree must divide the global batch (kept by accumulation)
        while world > 0 and self.cfg.train.global_batch % (world // (p.tp * p.pp)):
            world -= model_parallel
        return world

    # ---- health daemon ----
    def _start_health(self) -> None:
        """Start a daemon (the embedded default) unless the config names a running one or "off"."""
        import queue

        self._health_queue: queue.Queue = queue.Queue()
        if self.cfg.fault.health == "off":
            return
        if self.health_addr or self.cfg.fault.health not in ("auto", ""):
            self.health_addr = self.health_addr or self.cfg.fault.health
            return
        from suanli.fault.health import DetectorConfig, start_daemon

        f = self.cfg.fault
        detectors = DetectorConfig(interval_s=f.heartbeat_interval_s, dead_after_s=f.dead_after_s,
                                   hang_floor_s=f.hang_after_s)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._daemon = start_daemon("127.0.0.1:0", str(self.run_dir / "health.db"), detectors=detectors)
        self._daemon.subscribe(self._health_queue.put)
        self.health_addr = self._daemon.address

    def _health_events(self) -> list:
        events = []
        while not self._health_queue.empty():
            events.append(self._health_queue.get_nowait())
        return events

    # ---- one attempt ----
    def _launch(self, world: int) -> tuple[list, list, object]:
        pg = placement_group([self._bundle() for _ in range(world)], strategy="PACK")
        ray.get(pg.ready(), timeout=120)
        actors = [RankWorker.options(num_cpus=1, resources={k: v for k, v in self._bundle().items() if k != "CPU"},
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                  for i in range(world)]
        ips = ray.get([a.node_ip.remote() for a in actors])
        port = ray.get(actors[0].reserve_port.remote())
        local_index: dict[str, int] = {}
        cfg = self._effective_cfg(world)
        refs = []
        for rank, (actor, ip) in enumerate(zip(actors, ips)):
            local = local_index.get(ip, 0)
            local_index[ip] = local + 1
            refs.append(actor.run.remote(to_toml(cfg), self._rank_env(rank, world, local, ips[0], port)))
        return actors, refs, pg

    def _effective_cfg(self, world: int) -> JobConfig:
        import copy

        cfg = copy.deepcopy(self.cfg)
        p = cfg.parallel
        p.dp_shard = world // (p.tp * p.pp * p.dp_replicate)
        return cfg

    def _rank_env(self, rank: int, world: int, local_rank: int, master: str, port: int) -> dict[str, str]:
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
               "MASTER_ADDR": master, "MASTER_PORT": str(port), "SUANLI_ACCELERATOR": self.acc.name,
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)), "PYTHONUNBUFFERED": "1",
               "SUANLI_INJECT_FAULTS": ",".join(self.faults)}
        if self.acc.visible_devices_env and self.acc.ray_resource not in ("GPU", "NPU"):
            # Ray narrows GPU/NPU visibility itself; for custom resources (MLU, MUSA) the
            # supervisor does it. Either way the process then sees its device as index 0.
            env[self.acc.visible_devices_env] = str(local_rank)
        if self.acc.device_type != "cpu":
            env["SUANLI_DEVICE_INDEX"] = "0"
        if self.health_addr:
            env.update(SUANLI_HEALTH_ADDR=self.health_addr, SUANLI_JOB=self.job,
                       SUANLI_RUN_DIR=str(self.run_dir.resolve()))
        return env

    def _watch(self, actors: list, refs: list) -> Recovery | None:
        """Wait for the gang to finish; return the first failure, classified."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, timeout=self.poll_s)
            for ref in done:
                rank = refs.index(ref)
                try:
                    ray.get(ref)
                except (ActorDiedError, WorkerCrashedError, ActorUnavailableError, RayActorError) as e:
                    kind = "node_lost" if self._node_of_actor_dead(actors[rank]) else "worker_lost"
                    return Recovery(kind, rank, type(e).__name__, self._fault_time(rank), time.time(),
                                    step_before=self._last_step())
                except RayTaskError as e:
                    cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
                    tb = getattr(cause, "tb", None) or str(e)
                    return Recovery("user_exception", rank, tb, None, time.time(), step_before=self._last_step())
            for ev in self._health_events():
                # The daemon sends a hung event only after the suspects had time to dump
                # their stacks, so the gang can be torn down at once.
                if ev.job == self.job and ev.kind == self._hung_kind:
                    return Recovery("hang", ev.rank, ev.message, self._fault_time(ev.rank), time.time(),
                                    step_before=self._last_step())
        return None

    def _node_of_actor_dead(self, actor) -> bool:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        try:
            from ray.util.state import get_actor

            info = get_actor(actor._actor_id.hex())
            return info is not None and info.node_id not in alive
        except Exception:
            return False

    def _fault_time(self, rank: int) -> float | None:
        """Injected faults leave a marker with the moment they fired; real ones don't."""
        markers = list((self.run_dir / "faults").glob(f"*-r{rank}")) if (self.run_dir / "faults").exists() else []
        times = [float(m.read_text().split()[0]) for m in markers if m.read_text().strip()]
        return max(times) if times else None

    def _last_step(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        lines = path.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0

    def _teardown(self, actors: list, pg) -> None:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            remove_placement_group(pg)
        except Exception:
            pass

    def _event(self, kind: str, **fields) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "kind": kind, "source": "supervisor", **fields}) + "\n")

    def _await_first_step(self, rec: Recovery, metrics_lines_before: int, actors, refs) -> None:
        """Note when the restarted gang completes its first step (the end of the outage)."""
        path = self.run_dir / "metrics.jsonl"
        while True:
            if path.exists():
                lines = path.read_text().splitlines()
                if len(lines) > metrics_lines_before:
                    first = json.loads(lines[metrics_lines_before])
                    rec.first_step_time = time.time()
                    rec.resumed_from = first["step"] - 1
                    return
            done, _ = ray.wait(refs, timeout=0.1)
            if done:
                return

    # ---- the job ----
    def run(self) -> dict:
        self._connect()
        self._start_health()
        start = time.time()
        self._event("job_start", workers=self.workers, faults=self.faults)
        try:
            while True:
                world = self._world_size()
                actors, refs, pg = self._launch(world)
                if self.recoveries and self.recoveries[-1].restarted_time is None:
                    rec = self.recoveries[-1]
                    rec.restarted_time, rec.world_size_after = time.time(), world
                    n_before = len((self.run_dir / "metrics.jsonl").read_text().splitlines()) \
                        if (self.run_dir / "metrics.jsonl").exists() else 0
                    self._await_first_step(rec, n_before, actors, refs)
                    self._event("recovered", **rec.as_summary())
                failure = self._watch(actors, refs)
                self._teardown(actors, pg)
                if failure is None:
                    break
                self._event("failure", failure=failure.failure, rank=failure.rank, detail=failure.detail[-2000:])
                policy = self.policies[failure.failure]
                if failure.failure == "user_exception" or self.restarts[failure.failure] >= policy.max_restarts:
                    raise JobFailed(f"{failure.failure} on rank {failure.rank}"
                                    + (f" (restart budget of {policy.max_restarts} spent)" if policy.max_restarts else "")
                                    + f":\n{failure.detail}")
                self.restarts[failure.failure] += 1
                self.recoveries.append(failure)
                time.sleep(policy.backoff_s * self.restarts[failure.failure])
        finally:
            if self._daemon is not None:
                self._daemon.stop()
        summary = self._summary(time.time() - start)
        if self._owns_ray:
            ray.shutdown()
        return summary

    def _summary(self, wall_s: float) -> dict:
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update(restarts=sum(self.restarts.values()), wall_s=round(wall_s, 2),
                       recoveries=[r.as_summary() for r in self.recoveries], launcher="ray")
        # The last attempt's trainer saw only its own steps; the job's endpoints and speed
        # come from every attempt's lines in metrics.jsonl.
        metrics = self.run_dir / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if rows:
            timed = rows[1:] or rows
            summary.update(first_loss=rows[0]["loss"], final_loss=rows[-1]["loss"],
                           tokens_per_s=sum(r["tokens_per_s"] for r in timed) / len(timed))
            if all(r.get("mfu") is not None for r in timed):
                summary["mfu"] = sum(r["mfu"] for r in timed) / len(timed)
        path.write_text(json.dumps(summary, indent=2))
        self._event("job_end", **{k: summary[k] for k in ("restarts", "wall_s")})
        return summary
