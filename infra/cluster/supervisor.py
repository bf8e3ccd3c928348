"""The Ray supervisor: gang-launch one actor per accelerator, watch for failures, classify
them, and restart from the newest valid checkpoint until the job is done.

Failure classes and what they get (each with its own budget and backoff):
  worker_lost / node_lost  tear down the gang, restart on the capacity that is left
  hang                     (the health daemon already asked the suspects for stack dumps)
                           the same restart
  user_exception           stop at once with the rank's traceback: a restart loop would
                           only repeat the bug
  diverging                handled inside the job by the spike guard's rollbacks (counted in
                           the summary); when the guard runs out of them, it stops the job:
                           restarting the same data at the same lr would diverge again
Elastic: tp × pp is kept and the data-parallel degree follows the accelerators available;
the global batch is kept by gradient accumulation (the trainer derives it from dp). When
capacity comes back, the job grows again right after the next checkpoint commits.

Warm restarts: the gang of actors outlives attempts (each actor forks its rank from a
pre-imported zygote), so after a rank's process dies or hangs only the ranks' processes are
replaced. A new gang is placed only when an actor or node is gone or the world size changes.
Each attempt reports to the health daemon under its own job name (<job>-a<N>), so the
silence of a torn-down attempt is never taken for a failure of the next one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError,
                            WorkerCrashedError)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from suanli.backends import get_accelerator
from suanli.infra.config import JobConfig, to_toml
from suanli.infra.cluster.progress import JobProgress
from suanli.infra.cluster.worker import RankProcessDied, RankWorker, TrainingError
from suanli.fault.checkpoint.manifest import read_latest

ACTOR_GONE = (ActorDiedError, WorkerCrashedError, ActorUnavailableError, RayActorError)
# After the first rank fails, how long to collect the others' outcomes before judging: a
# killed rank's peers fail in their next collective within milliseconds, and the cause must
# be told from its consequences.
GRACE_S = 1.0
STOP_TIMEOUT_S = 15.0


@dataclass
class RestartPolicy:
    max_restarts: int
    backoff_s: float


DEFAULT_POLICIES = {
    "worker_lost": RestartPolicy(5, 1.0),
    "node_lost": RestartPolicy(5, 2.0),
    "hang": RestartPolicy(3, 1.0),
    "user_exception": RestartPolicy(0, 0.0),
    "diverging": RestartPolicy(0, 0.0),
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
class Gang:
    actors: list        # one RankWorker per rank, rank order
    ips: list[str]      # each actor's node address
    pg: object          # the placement group holding their bundles


class HeartbeatLost(RuntimeError):
    """The health daemon stopped hearing from a rank (its `dead` event)."""


def _cause(e: BaseException) -> BaseException:
    """The exception a rank raised, out of Ray's wrapper."""
    return getattr(e, "cause", None) or e if isinstance(e, RayTaskError) else e


def _consume(refs: list) -> None:
    """Fetch the outcomes of an attempt's ranks that were stopped: they are known, and Ray
    would otherwise print each one as an unhandled error."""
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
    for ref in done:
        try:
            ray.get(ref)
        except Exception:
            pass


def _ready(pg) -> bool:
    try:
        ray.get(pg.ready(), timeout=0)
        return True
    except GetTimeoutError:
        return False


@dataclass
class Supervisor:
    cfg: JobConfig
    workers: int
    ray_address: str | None = None
    faults: list[str] = field(default_factory=list)
    health_addr: str | None = None        # a running daemon; None starts one
    policies: dict = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    poll_s: float = 0.2
    show_progress: bool = True            # the live view (infra/cluster/progress.py) on stdout

    def __post_init__(self) -> None:
        self.run_dir = Path(self.cfg.train.run_dir)
        self.acc = get_accelerator()
        self.recoveries: list[Recovery] = []
        self.restarts: dict[str, int] = {k: 0 for k in self.policies}
        self._daemon = None
        # room for the attempt suffix within the daemon's 128-character job names
        self.job = "".join(c if c.isalnum() or c in "._-" else "-" for c in self.run_dir.name)[:120] or "job"
        self.initial_world = 0
        from suanli.fault.proto import health_pb2

        self._hung_kind, self._dead_kind = health_pb2.EVENT_HUNG, health_pb2.EVENT_DEAD

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

    def _health_counts(self, job: str):
        """Ranks of this attempt by the daemon's state (ok, straggler, ...), at most once a second."""
        from collections import Counter

        now = time.time()
        if now - getattr(self, "_health_at", 0.0) < 1.0:
            return getattr(self, "_health_last", None)
        self._health_at = now
        try:
            if self._daemon is not None:
                reply = self._daemon.status()
            elif self.health_addr:
                from suanli.fault.health.client import HealthClient

                with HealthClient(self.health_addr) as c:
                    reply = c.status(job)
            else:
                return None
            self._health_last = Counter(m.state for m in reply.members if m.job == job and m.rank >= 0)
        except Exception:  # the view must never take the job down
            self._health_last = None
        return self._health_last

    def _health_events(self) -> list:
        events = []
        while not self._health_queue.empty():
            events.append(self._health_queue.get_nowait())
        return events

    # ---- the gang (outlives attempts) ----
    def _place(self, world: int) -> Gang:
        """Reserve `world` bundles and start one actor in each. If capacity drops while the
        reservation waits (a node that died is not yet marked dead), start over smaller."""
        deadline = time.time() + 300
        while True:
            pg = placement_group([self._bundle() for _ in range(world)], strategy="PACK")
            while time.time() < deadline:
                try:
                    ray.get(pg.ready(), timeout=5)
                    break
                except GetTimeoutError:
                    if self._world_size() != world:
                        break
            else:
                remove_placement_group(pg)
                raise JobFailed(f"could not place {world} worker(s) in 300 s (cluster: {self.capacity()} slot(s))")
            if self._world_size() != world or not _ready(pg):
                remove_placement_group(pg)
                world = self._world_size()
                continue
            actors = [RankWorker.options(num_cpus=1, resources={k: v for k, v in self._bundle().items() if k != "CPU"},
                                         scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                      for i in range(world)]
            return Gang(actors, ray.get([a.node_ip.remote() for a in actors]), pg)

    def _start_attempt(self, gang: Gang, attempt: int) -> list:
        port = ray.get(gang.actors[0].reserve_port.remote())
        world = len(gang.actors)
        cfg = to_toml(self._effective_cfg(world))
        local_index: dict[str, int] = {}
        refs = []
        for rank, (actor, ip) in enumerate(zip(gang.actors, gang.ips)):
            local = local_index.get(ip, 0)
            local_index[ip] = local + 1
            refs.append(actor.run.remote(cfg, self._rank_env(rank, world, local, gang.ips[0], port, attempt)))
        return refs

    def _stop_attempt(self, gang: Gang) -> bool:
        """End every rank's process; True when every actor is still there to run the next attempt."""
        stops = [a.stop.remote() for a in gang.actors]
        try:
            ray.get(stops, timeout=STOP_TIMEOUT_S)
            return True
        except (GetTimeoutError, *ACTOR_GONE):
            return False

    def _effective_cfg(self, world: int) -> JobConfig:
        import copy

        cfg = copy.deepcopy(self.cfg)
        p = cfg.parallel
        p.dp_shard = world // (p.tp * p.pp * p.dp_replicate)
        return cfg

    def _attempt_job(self, attempt: int) -> str:
        return f"{self.job}-a{attempt}"

    def _rank_env(self, rank: int, world: int, local_rank: int, master: str, port: int,
                  attempt: int) -> dict[str, str]:
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
               "MASTER_ADDR": master, "MASTER_PORT": str(port), "SUANLI_ACCELERATOR": self.acc.name,
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)), "PYTHONUNBUFFERED": "1",
               "SUANLI_INJECT_FAULTS": ",".join(self.faults),
               # the live view is the supervisor's; each rank's own output goes to its log
               "SUANLI_RANK_LOG": str((self.run_dir / "logs" / f"rank{rank}.log").resolve())}
        if self.acc.visible_devices_env and self.acc.ray_resource not in ("GPU", "NPU"):
            # Ray narrows GPU/NPU visibility itself; for custom resources (MLU, MUSA) the
            # supervisor does it. Either way the process then sees its device as index 0.
            env[self.acc.visible_devices_env] = str(local_rank)
        if self.acc.device_type != "cpu":
            env["SUANLI_DEVICE_INDEX"] = "0"
        if self.health_addr:
            env.update(SUANLI_HEALTH_ADDR=self.health_addr, SUANLI_JOB=self._attempt_job(attempt),
                       SUANLI_RUN_DIR=str(self.run_dir.resolve()))
        return env

    # ---- watching one attempt ----
    def _watch(self, gang: Gang, refs: list, attempt: int) -> Recovery | None:
        """Wait for the attempt to finish; return the first failure, classified, or a planned
        grow once capacity is back and a checkpoint has committed."""
        pending, outcomes, first_error = list(refs), {}, None
        job, grow_mark, next_capacity_check = self._attempt_job(attempt), None, 0.0
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
            self._view.poll(len(gang.actors), sum(self.restarts.values()), self._health_counts(job))
            for ref in done:
                rank = refs.index(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - every way a rank ends is classified below
                    outcomes[rank] = e
                    first_error = first_error or time.time()
            for ev in self._health_events():
                if ev.job != job:
                    continue  # an earlier attempt's ranks going silent after their teardown
                if ev.kind == self._hung_kind:
                    # The daemon sends a hung event only after the suspects had time to dump
                    # their stacks, so the gang can be torn down at once.
                    return Recovery("hang", ev.rank, ev.message, self._fault_time(ev.rank), time.time(),
                                    step_before=self._last_step())
                if ev.kind == self._dead_kind and ev.rank >= 0:
                    outcomes.setdefault(ev.rank, HeartbeatLost(ev.message))
                    first_error = first_error or time.time()
            if first_error is not None and (not pending or time.time() - first_error >= GRACE_S):
                return self._classify(gang, outcomes)
            if len(gang.actors) < self.initial_world and time.time() >= next_capacity_check:
                next_capacity_check = time.time() + 1.0
                if grow_mark is None and self._world_size() > len(gang.actors):
                    grow_mark = read_latest(self._ckpt_dir()) or ""
                elif grow_mark is not None and (read_latest(self._ckpt_dir()) or "") != grow_mark:
                    return Recovery("grow", None, f"capacity for {self._world_size()} worker(s) is back",
                                    None, time.time(), step_before=self._last_step())
        return None

    def _classify(self, gang: Gang, outcomes: dict) -> Recovery:
        """The cause among the outcomes, not its consequences: a gone actor or a killed
        process before a user's exception, and that before the broken collectives of the
        peers that were left waiting."""
        step, now = self._last_step(), time.time()
        for rank, e in sorted(outcomes.items()):
            if isinstance(e, ACTOR_GONE):
                kind = "node_lost" if self._node_of_actor_dead(gang.actors[rank]) else "worker_lost"
                return Recovery(kind, rank, type(e).__name__, self._fault_time(rank), now, step_before=step)
        causes = {rank: _cause(e) for rank, e in outcomes.items()}
        for rank, c in sorted(causes.items()):
            if isinstance(c, RankProcessDied):
                return Recovery("worker_lost", rank, str(c), self._fault_time(rank), now, step_before=step)
        for rank, c in sorted(causes.items()):
            if isinstance(c, TrainingError) and not c.comm_failure:
                kind = "diverging" if c.diverging else "user_exception"
                return Recovery(kind, rank, c.tb, None, now, step_before=step)
            if not isinstance(c, (TrainingError, HeartbeatLost)):
                return Recovery("user_exception", rank, f"{type(c).__name__}: {c}", None, now, step_before=step)
        # Only broken collectives and silent ranks: someone went away without a word we
        # have seen yet (e.g. Ray is slow to report a dead actor). Name the silent one.
        silent = [r for r, c in sorted(causes.items()) if isinstance(c, HeartbeatLost)]
        rank = silent[0] if silent else min(causes)
        return Recovery("worker_lost", rank, str(causes[rank])[-2000:], self._fault_time(rank), now, step_before=step)

    def _node_of_actor_dead(self, actor) -> bool:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        try:
            from ray.util.state import get_actor

            info = get_actor(actor._actor_id.hex())
            return info is not None and info.node_id not in alive
        except Exception:
            return False

    def _fault_time(self, rank: int | None) -> float | None:
        """Injected faults leave a marker with the moment they fired; real ones don't."""
        if rank is None or not (self.run_dir / "faults").exists():
            return None
        markers = list((self.run_dir / "faults").glob(f"*-r{rank}"))
        times = [float(m.read_text().split()[0]) for m in markers if m.read_text().strip()]
        return max(times) if times else None

    def _ckpt_dir(self) -> Path:
        return Path(self.cfg.checkpoint.dir) if self.cfg.checkpoint.dir else self.run_dir / "checkpoints"

    def _metrics_lines(self) -> list[str]:
        path = self.run_dir / "metrics.jsonl"
        return path.read_text().splitlines() if path.exists() else []

    def _last_step(self) -> int:
        lines = self._metrics_lines()
        return json.loads(lines[-1])["step"] if lines else 0

    def _teardown(self, gang: Gang) -> None:
        for a in gang.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            remove_placement_group(gang.pg)
        except Exception:
            pass

    def _event(self, kind: str, **fields) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "kind": kind, "source": "supervisor", **fields}) + "\n")

    def _await_first_step(self, rec: Recovery, metrics_lines_before: int, refs) -> None:
        """Note when the restarted gang completes its first step (the end of the outage)."""
        while True:
            lines = self._metrics_lines()
            if len(lines) > metrics_lines_before:
                first = json.loads(lines[metrics_lines_before])
                rec.first_step_time = time.time()
                rec.resumed_from = first["step"] - 1
                return
            done, _ = ray.wait(refs, timeout=0.05)
            if done:
                return

    # ---- the job ----
    def run(self) -> dict:
        self._connect()
        self._start_health()
        start = time.time()
        self._event("job_start", workers=self.workers, faults=self.faults)
        self._view = JobProgress(self.run_dir, self.cfg.train.steps, self.show_progress)
        gang, attempt = None, 0
        try:
            self.initial_world = self._world_size()
            while True:
                world = self._world_size()
                if gang is None:
                    gang = self._place(world)
                refs = self._start_attempt(gang, attempt)
                if self.recoveries and self.recoveries[-1].restarted_time is None:
                    rec = self.recoveries[-1]
                    rec.restarted_time, rec.world_size_after = time.time(), len(gang.actors)
                    self._await_first_step(rec, len(self._metrics_lines()), refs)
                    self._event("recovered", **rec.as_summary())
                failure = self._watch(gang, refs, attempt)
                if failure is None:
                    break
                self._event("failure", failure=failure.failure, rank=failure.rank, detail=failure.detail[-2000:])
                # Keep the gang when every actor is alive and the world size stays.
                alive = self._stop_attempt(gang)
                _consume(refs)
                if not alive or failure.failure == "grow" or self._world_size() != len(gang.actors):
                    self._teardown(gang)
                    gang = None
                attempt += 1
                if failure.failure == "grow":
                    self.recoveries.append(failure)
                    continue
                policy = self.policies[failure.failure]
                if self.restarts[failure.failure] >= policy.max_restarts:
                    raise JobFailed(f"{failure.failure} on rank {failure.rank}"
                                    + (f" (restart budget of {policy.max_restarts} spent)" if policy.max_restarts else "")
                                    + f":\n{failure.detail}")
                self.restarts[failure.failure] += 1
                self.recoveries.append(failure)
                # The first restart of a kind is immediate; repeats back off (a crash loop
                # should not hammer the cluster, a single fault should not cost seconds).
                time.sleep(policy.backoff_s * (self.restarts[failure.failure] - 1))
        finally:
            self._view.close()
            if gang is not None:
                self._stop_attempt(gang)
                self._teardown(gang)
            if self._daemon is not None:
                self._daemon.stop()
        summary = self._summary(time.time() - start)
        if self._owns_ray:
            ray.shutdown()
        return summary

    def _summary(self, wall_s: float) -> dict:
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        events = self.run_dir / "events.jsonl"
        rollbacks = sum('"kind": "rollback"' in x for x in events.read_text().splitlines()) if events.exists() else 0
        summary.update(restarts=sum(self.restarts.values()), wall_s=round(wall_s, 2), rollbacks=rollbacks,
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
