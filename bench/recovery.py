"""`suanli bench recovery`: how fast the same job comes back from the same fault under suanli's
supervisor, torchrun `--max-restarts` and Ray Train's `TorchTrainer` with `FailureConfig`.

Method. One small job (tiny model, synthetic data, the same checkpoint interval) runs under
each launcher, once per fault: `kill:rank=1:step=K` (the process SIGKILLs itself after step
K) and `hang:rank=0:step=K` (the rank blocks in a receive nobody answers, so its peer sits in
its next collective). Every rank runs the same suanli Trainer, which resumes itself from the
newest checkpoint in the run directory; only the launcher differs (bench/recovery_legs.py).
Times come from three places that share one clock: the fault's marker file (written the
moment it fires), the `time` of each metrics.jsonl line (rank 0, one per step), and each
launcher's own moment of acting on the failure:
  suanli    the supervisor's record (summary.json `recoveries[].detection_s`)
  torchrun  arrival of the agent's first failure line on its stderr ("failed (exitcode ...)"
            or "Sending process ... closing signal"), read line by line as it is written
  Ray Train its controller calling `UserCallback.after_exception` (logged with the time)
"First step after resume" is the first metrics line of the restarted attempt (the step
count goes back to the checkpoint); steps recomputed = the last step reached before the
fault - the checkpoint step resumed from. A hang is not noticed by the peers until their
collective timeout, so their wait is capped at --hang-wait seconds and then killed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAUNCHERS = ("suanli", "torchrun", "raytrain")
FAULTS = {"kill": 1, "hang": 0}   # fault kind -> the rank it hits
TORCHRUN_FAILURE = re.compile(r"failed \(exitcode|closing signal|will restart worker group")
KILL_TARGET = 0.5                 # suanli's kill recovery <= this x the better peer's
HANG_TARGET_S = 30.0
LEG_MARKER = "SUANLI_RECOVERY_LEG"   # env var naming the leg every process it starts inherits


@dataclass
class RecoverySpec:
    steps: int = 50
    checkpoint_every: int = 10
    fault_step: int = 25
    workers: int = 2
    max_restarts: int = 3
    hang_wait_s: float = 120.0
    leg_timeout_s: float = 420.0
    seq_len: int = 64
    global_batch: int = 8
    micro_batch: int = 4
    launchers: list[str] = field(default_factory=lambda: list(LAUNCHERS))
    faults: list[str] = field(default_factory=lambda: list(FAULTS))

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.checkpoint_every >= 1, f"--checkpoint-every: must be >= 1, got {self.checkpoint_every}")
        need(0 < self.fault_step < self.steps,
             f"--fault-step: must be between 1 and --steps - 1 ({self.steps - 1}), got {self.fault_step}")
        need(self.fault_step % self.checkpoint_every != 0,
             f"--fault-step {self.fault_step} is a checkpoint step (every {self.checkpoint_every}): nothing would "
             f"be recomputed and a resume could not be told apart; pick a step between checkpoints, e.g. "
             f"{self.fault_step + self.checkpoint_every // 2}")
        need(self.fault_step > self.checkpoint_every,
             f"--fault-step {self.fault_step}: must come after the first checkpoint (step {self.checkpoint_every})")
        need(self.workers >= 2, f"--workers: the faults need a peer rank; use 2 or more, got {self.workers}")
        bad = [x for x in self.launchers if x not in LAUNCHERS]
        need(not bad and bool(self.launchers), f"--launchers: unknown {bad}; choose from {', '.join(LAUNCHERS)}")
        bad = [x for x in self.faults if x not in FAULTS]
        need(not bad and bool(self.faults), f"--faults: unknown {bad}; choose from {', '.join(FAULTS)}")
        need(self.hang_wait_s > 0, f"--hang-wait: must be > 0 seconds, got {self.hang_wait_s}")

    def fault(self, kind: str) -> str:
        return f"{kind}:rank={FAULTS[kind]}:step={self.fault_step}"


def require_ray_train() -> None:
    try:
        import ray.train.torch  # noqa: F401
        from ray.train import UserCallback  # noqa: F401  (Ray Train V2, Ray >= 2.43)
    except ImportError as e:
        raise SystemExit(f"the Ray Train leg needs ray[train] with the Train V2 API ({e}): "
                         f"pip install 'suanli[bench]' (or leave it out: --launchers suanli,torchrun)") from None


def job_config(spec: RecoverySpec, run_dir: Path):
    from suanli.infra.config import load_config

    cfg = load_config(None, [
        "model.preset=tiny", f"train.steps={spec.steps}", f"train.seq_len={spec.seq_len}",
        f"train.global_batch={spec.global_batch}", f"train.micro_batch={spec.micro_batch}", "train.lr=1e-3",
        "train.warmup_steps=5", "data.synthetic_tokens=200000", f"checkpoint.every_steps={spec.checkpoint_every}"])
    cfg.train.run_dir = str(run_dir.resolve())
    return cfg


def collective_timeouts(launchers: list[str]) -> dict:
    """The collective timeout each peer's ranks run under: what finally ends a hang there.
    Under torchrun the Trainer makes the process group (suanli's init timeout); under Ray
    Train, TorchTrainer does (TorchConfig's default)."""
    import inspect

    from suanli.infra.distributed import init

    out = {"torchrun": float(inspect.signature(init).parameters["timeout_s"].default)}
    if "raytrain" in launchers:
        from ray.train.torch import TorchConfig

        out["raytrain"] = float(TorchConfig().timeout_s)
    return out


# ---- one leg: a launcher and a fault ----
class Leg:
    def __init__(self, launcher: str, kind: str, spec: RecoverySpec, root: Path) -> None:
        self.launcher, self.kind, self.spec = launcher, kind, spec
        self.run_dir = root / f"{launcher}-{kind}"
        self.run_dir.mkdir(parents=True)
        self.fault = spec.fault(kind)
        self.marker = f"{os.getpid()}-{launcher}-{kind}-{time.time():.0f}"
        self.agent_failures: list[float] = []   # torchrun: arrival times of failure lines

    def command(self) -> list[str]:
        from suanli.infra.config import to_toml

        cfg_toml = to_toml(job_config(self.spec, self.run_dir))
        cfg_path = self.run_dir.parent / f"{self.run_dir.name}.toml"
        cfg_path.write_text(cfg_toml)
        if self.launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(self.spec.workers), "--max-restarts", str(self.spec.max_restarts),
                    "-m", "suanli.bench.recovery_legs", "rank", str(cfg_path)]
        leg = {"run_dir": str(self.run_dir.resolve()), "cfg_toml": cfg_toml, "fault": self.fault,
               "workers": self.spec.workers, "max_restarts": self.spec.max_restarts}
        leg_path = self.run_dir.parent / f"{self.run_dir.name}.json"
        leg_path.write_text(json.dumps(leg))
        return [sys.executable, "-m", "suanli.bench.recovery_legs", self.launcher, str(leg_path)]

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", SUANLI_INJECT_FAULTS=self.fault, **{LEG_MARKER: self.marker},
                   # the supervisor's choice for its ranks, given to every launcher
                   OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // self.spec.workers)))
        env.pop("RAY_ADDRESS", None)  # each leg starts a local cluster of its own
        env["RAY_TRAIN_V2_ENABLED"] = "1"  # the default in recent Ray; opt-in since 2.43
        if self.launcher == "torchrun":
            # torchrun's documented workaround (pytorch/pytorch#135712): with the rendezvous
            # store shared with the workers, a restarted gloo group reads the previous
            # attempt's addresses and never connects (seen with torch 2.13 here).
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        return env

    def _read_agent(self, stream, log) -> None:
        for line in iter(stream.readline, ""):
            if TORCHRUN_FAILURE.search(line):
                self.agent_failures.append(time.time())
            log.write(line)
        stream.close()

    def run(self) -> dict:
        log_path = self.run_dir.parent / f"{self.run_dir.name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(self.command(), cwd=self.run_dir.parent, env=self.env(), stdout=log,
                                    stderr=subprocess.PIPE if self.launcher == "torchrun" else log,
                                    text=True, start_new_session=True)
            reader = None
            if self.launcher == "torchrun":
                reader = threading.Thread(target=self._read_agent, args=(proc.stderr, log), daemon=True)
                reader.start()
            try:
                outcome = self._wait(proc)
            finally:
                kill_tree(proc, self.marker)
                if reader is not None:
                    reader.join(timeout=5)
        return self.measure(outcome, proc.returncode)

    def _wait(self, proc) -> str:
        deadline = time.time() + self.spec.leg_timeout_s + (self.spec.hang_wait_s if self.kind == "hang" else 0)
        while proc.poll() is None:
            fault_t = self.fault_time()
            if (self.kind == "hang" and self.launcher != "suanli" and fault_t is not None
                    and time.time() > fault_t + self.spec.hang_wait_s and self.detected_time(fault_t) is None):
                return "hang-wait"
            if time.time() > deadline:
                return "timeout"
            time.sleep(0.1)
        return "exited"

    # ---- measurements ----
    def fault_time(self) -> float | None:
        d = self.run_dir / "faults"
        times = [float(t) for m in d.glob("*") if (t := m.read_text().strip())] if d.exists() else []
        return min(times) if times else None

    def detected_time(self, fault_t: float) -> float | None:
        if self.launcher == "torchrun":
            after = [t for t in self.agent_failures if t >= fault_t]
        elif self.launcher == "raytrain":
            after = [r["time"] for r in _jsonl(self.run_dir / "raytrain-failures.jsonl") if r["time"] >= fault_t]
        else:
            after = [e["time"] for e in _jsonl(self.run_dir / "events.jsonl")
                     if e.get("source") == "supervisor" and e["kind"] == "failure" and e["time"] >= fault_t]
        return min(after) if after else None

    def measure(self, outcome: str, returncode: int | None) -> dict:
        rows = _jsonl(self.run_dir / "metrics.jsonl")
        leg = json.loads((self.run_dir / "leg.json").read_text()) if (self.run_dir / "leg.json").exists() else {}
        fault_t = self.fault_time()
        r = {"launcher": self.launcher, "fault": self.fault, "outcome": outcome, "returncode": returncode,
             "fault_fired": fault_t is not None, "detection_s": None, "first_step_after_resume_s": None,
             "last_step_before_fault": None, "resumed_from_step": None, "steps_recomputed": None,
             "steps_done": max((x["step"] for x in rows), default=0)}
        r["finished"] = (outcome == "exited" and r["steps_done"] == self.spec.steps
                         and (returncode == 0 if self.launcher == "torchrun" else bool(leg.get("finished"))))
        if leg.get("error"):
            r["error"] = leg["error"]
        if fault_t is None:
            return r
        if self.launcher == "suanli":
            recs = (leg.get("summary") or {}).get("recoveries") or []
            r["supervisor_recoveries"] = recs
            own = recs[0].get("detection_s") if recs else None
            detected = self.detected_time(fault_t)
            r["detection_s"] = own if own is not None else (None if detected is None else round(detected - fault_t, 3))
        else:
            detected = self.detected_time(fault_t)
            r["detection_s"] = None if detected is None else round(detected - fault_t, 3)
            launches = [x["time"] for x in _jsonl(self.run_dir / "launches.jsonl") if x["time"] >= fault_t]
            r["new_ranks_started_s"] = round(min(launches) - fault_t, 3) if launches else None
        fault_i = next((i for i, x in enumerate(rows) if x["step"] == self.spec.fault_step), None)
        if fault_i is None:
            return r
        # the restarted attempt begins where the step count goes back (to its checkpoint + 1)
        resume_i = next((i for i in range(fault_i + 1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"]), None)
        before = rows[:resume_i] if resume_i is not None else rows
        r["last_step_before_fault"] = max(x["step"] for x in before)
        if resume_i is not None:
            first = rows[resume_i]
            r["resumed_from_step"] = first["step"] - 1
            r["steps_recomputed"] = r["last_step_before_fault"] - r["resumed_from_step"]
            r["first_step_after_resume_s"] = round(first["time"] - fault_t, 3)
        return r


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    return out


def kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL everything the leg started: its process group, its descendants (torchrun puts
    its ranks in sessions of their own), and any process that carries the leg's marker in its
    environment (ranks a dying parent left to init, Ray's workers)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    strays = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(LEG_MARKER) == marker:
                p.kill()
                strays.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    psutil.wait_procs(kids + strays, timeout=10)


# ---- the whole benchmark ----
def run_recovery(spec: RecoverySpec, keep_runs: Path | None = None, progress=print) -> dict:
    spec.validate()
    if "raytrain" in spec.launchers:
        require_ray_train()
    from suanli.bench.report import machine_info

    machine = machine_info()
    root = Path(keep_runs) if keep_runs else Path(tempfile.mkdtemp(prefix="suanli-recovery-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    # Interrupts and `kill` must reach the `finally` that ends a leg's processes (a
    # background shell starts us with SIGINT ignored).
    main = threading.current_thread() is threading.main_thread()
    previous = ({sig: signal.signal(sig, h) for sig, h in ((signal.SIGINT, signal.default_int_handler),
                                                             (signal.SIGTERM, _raise_interrupt))} if main else {})
    try:
        for kind in spec.faults:
            for launcher in spec.launchers:
                progress(f"[recovery] {launcher} with {spec.fault(kind)} ...")
                results.append(Leg(launcher, kind, spec, root).run())
                progress(f"[recovery]   {_describe(results[-1])}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if keep_runs is None:
            shutil.rmtree(root, ignore_errors=True)
    import torch
    from torch.distributed.run import get_args_parser

    timeouts = collective_timeouts(spec.launchers)
    return {"spec": asdict(spec), "machine": machine, "torch": torch.__version__,
            "torchrun_monitor_interval_s": get_args_parser().get_default("monitor_interval"),
            "collective_timeout_s": timeouts, "results": results, "targets": targets(results, spec)}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _describe(r: dict) -> str:
    return (f"detected {_s(r['detection_s'])}, first step after resume {_s(r['first_step_after_resume_s'])}, "
            f"recomputed {r['steps_recomputed']}, finished {r['finished']} ({r['outcome']})")


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f} s"


def targets(results: list[dict], spec: RecoverySpec) -> dict:
    def get(launcher, kind):
        return next((r for r in results if r["launcher"] == launcher and r["fault"].startswith(kind)), None)

    out = {}
    ours = get("suanli", "kill")
    peers = [r["first_step_after_resume_s"] for p in ("torchrun", "raytrain")
             if (r := get(p, "kill")) and r["finished"] and r["first_step_after_resume_s"] is not None]
    if ours and peers:
        mine = ours["first_step_after_resume_s"]
        out["kill_recovery"] = {"suanli_s": mine, "better_peer_s": min(peers), "target_s": KILL_TARGET * min(peers),
                                "met": mine is not None and ours["finished"] and mine <= KILL_TARGET * min(peers)}
    hang = get("suanli", "hang")
    if hang:
        d = hang["detection_s"]
        out["hang_detection"] = {"suanli_s": d, "target_s": HANG_TARGET_S, "met": d is not None and d <= HANG_TARGET_S}
    return out


# ---- report ----
def format_recovery(res: dict) -> str:
    spec = res["spec"]
    timeouts = res["collective_timeout_s"]
    head = ["launcher", "fault", "detected (s)", "fault -> first step after resume (s)", "steps recomputed",
            "resumed from", "finished"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---|"]
    for r in res["results"]:
        detected = _s(r["detection_s"]).replace(" s", "")
        if r["outcome"] == "hang-wait":
            t = timeouts.get(r["launcher"])
            detected = f"not detected within {spec['hang_wait_s']:g} s (their timeout: {t:g} s)"
        elif not r["fault_fired"]:
            detected = "fault never fired"
        lines.append(f"| {r['launcher']} | {r['fault']} | {detected} | "
                     f"{_s(r['first_step_after_resume_s']).replace(' s', '')} | {_or(r['steps_recomputed'])} | "
                     f"{_or(r['resumed_from_step'])} | {'yes' if r['finished'] else 'no (' + r['outcome'] + ')'} |")
    t = res["targets"]
    if "kill_recovery" in t:
        k = t["kill_recovery"]
        lines.append(f"\ntarget: suanli kill recovery {_s(k['suanli_s'])} <= {KILL_TARGET} x better peer "
                     f"({_s(k['better_peer_s'])}) = {_s(k['target_s'])}: {'MET' if k['met'] else 'MISSED'}")
    if "hang_detection" in t:
        h = t["hang_detection"]
        lines.append(f"target: suanli hang detected {_s(h['suanli_s'])} <= {HANG_TARGET_S:g} s: "
                     f"{'MET' if h['met'] else 'MISSED'}")
    return "\n".join(lines)


def _or(x) -> str:
    return "-" if x is None else str(x)


def write_report(res: dict, out_dir: Path, command: str) -> Path:
    from suanli.bench.report import machine_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"recovery-{time.strftime('%Y%m%d')}"
    spec = res["spec"]
    md = [f"# Recovery: suanli vs torchrun vs Ray Train ({time.strftime('%Y-%m-%d')})", "",
          f"Command: `{command}`", "", machine_markdown(res["machine"]), "",
          f"Job: tiny model, {spec['workers']} CPU ranks, {spec['steps']} steps, seq_len {spec['seq_len']}, "
          f"global batch {spec['global_batch']}, async checkpoint every {spec['checkpoint_every']} steps, "
          f"fault after step {spec['fault_step']}; torchrun `--standalone --max-restarts {spec['max_restarts']}` "
          f"(monitor interval {res['torchrun_monitor_interval_s']:g} s, its default), Ray Train "
          f"`FailureConfig(max_failures={spec['max_restarts']})` with its defaults.", "",
          format_recovery(res), "", "## Notes", "", *[f"- {n}" for n in notes(res)], "",
          "## Method", "", "```", (__doc__ or "").split("Method. ", 1)[-1].strip(), "```", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    stem.with_suffix(".json").write_text(json.dumps({**res, "command": command}, indent=2))
    return stem.with_suffix(".md")


def notes(res: dict) -> list[str]:
    out = []
    relaunch = [f"{r['launcher']} {r['fault'].split(':')[0]} {r['new_ranks_started_s']:.2f} s"
                for r in res["results"] if r.get("new_ranks_started_s") is not None]
    if relaunch:
        out.append("fault -> the peers' restarted ranks entering the training code, after their Python and torch "
                   "imports (launches.jsonl): " + ", ".join(relaunch) + "; the rest of their outage is "
                   "process-group init, model build, checkpoint load and the first step.")
    if any(r["launcher"] == "torchrun" for r in res["results"]):
        out.append("torchrun ran with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, its documented workaround for "
                   "pytorch/pytorch#135712: without it a restarted gloo group reads the previous attempt's "
                   "addresses from the shared rendezvous store and never connects (seen with this torch).")
    load = res["machine"].get("load_average")
    if load and load[0] > (res["machine"].get("cpus") or 1):
        out.append(f"the host was busy (1-minute load {load[0]} on {res['machine'].get('cpus')} CPUs): "
                   f"process start-up times, and so every launcher's outage, are inflated.")
    return out


# ---- CLI ----
def add_recovery_args(p) -> None:
    d = RecoverySpec()
    p.add_argument("--launchers", default=",".join(d.launchers), help="comma-separated: suanli,torchrun,raytrain")
    p.add_argument("--faults", default=",".join(d.faults), help="comma-separated: kill,hang")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--fault-step", type=int, default=d.fault_step, help="the fault fires after this step")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--max-restarts", type=int, default=d.max_restarts,
                   help="torchrun --max-restarts and Ray Train max_failures")
    p.add_argument("--hang-wait", type=float, default=d.hang_wait_s,
                   help="seconds the peers get to notice a hang before they are killed")
    p.add_argument("--leg-timeout", type=float, default=d.leg_timeout_s,
                   help="seconds per launcher and fault (a hang leg gets --hang-wait more)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--keep-runs", default=None, metavar="DIR", help="keep run directories and logs here")
    p.add_argument("--out", default="bench/results", help="where recovery-<date>.md/.json go ('' : not written)")
    p.add_argument("--json", action="store_true")


def run_recovery_cmd(args) -> int:
    spec = RecoverySpec(steps=args.steps, checkpoint_every=args.checkpoint_every, fault_step=args.fault_step,
                        workers=args.workers, max_restarts=args.max_restarts, hang_wait_s=args.hang_wait,
                        leg_timeout_s=args.leg_timeout, seq_len=args.seq_len,
                        launchers=[x.strip() for x in args.launchers.split(",") if x.strip()],
                        faults=[x.strip() for x in args.faults.split(",") if x.strip()])
    try:
        spec.validate()
    except ValueError as e:
        raise SystemExit(f"suanli bench recovery: {e}") from None
    res = run_recovery(spec, Path(args.keep_runs) if args.keep_runs else None,
                       progress=(lambda *_: None) if args.json else print)
    if args.out:
        path = write_report(res, Path(args.out), " ".join(["suanli", "bench"] + sys.argv[2:]))
        res["report"] = str(path)
    print(json.dumps(res, indent=2) if args.json else format_recovery(res), flush=True)
    return 0
