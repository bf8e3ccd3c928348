"""`suanli bench mfu`: MFU of real training steps through suanli's Trainer.

One run = one layout. Every rank builds the Trainer from a config made of the spec, the
benchmark registers trainer hooks (it never edits the loop) and calls `Trainer.fit()`:

- warm-up steps are run and discarded (allocator, autotuning, first collectives);
- each timed step is the trainer's whole loop iteration: data fetch, forward/backward,
  gradient sync, optimizer, metrics — from the "data" phase hook to the step-end hook;
  a job's step time is the slowest rank's, and the run's is the median over timed steps;
- tokens/s per device = global tokens per step ÷ step time ÷ world size (every device
  counts: tensor- and pipeline-parallel ranks share the same tokens);
- MFU = tokens/s per device × model FLOPs per token ÷ peak (bench/flops.py conventions);
  HFU adds what activation checkpointing recomputes;
- extra steps after the timed ones run under torch.profiler for where the time went
  (bench/breakdown.py).

The peak is the user's (`--peak-tflops`), the HAL table's (`table:<device>`), or measured
by the GEMM probe on every rank at once, before and again after training (`--peak
measured`: each rank gets the share of the machine it trains with; the better of the two
probes counts, since other load on a shared machine only ever lowers a probe). With none
of these, MFU is reported unknown.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, fields

from suanli.bench.breakdown import METHOD, STEP_MARK, breakdown_from_events, bubble_formula, mean_breakdown
from suanli.bench.flops import achieved_flops_per_device, hardware_flops_per_token, mfu, model_flops_per_token

PEAK_MODES = ("table", "measured")
DP_MODES = ("fsdp", "ddp")

# Benchmarks time training, not saving: no checkpoints and no resuming from an old run.
# Applied only where the job config has the key, so the benchmark works across versions.
NO_CHECKPOINTS = ("checkpoint.every_steps=0", "checkpoint.resume=false")


def supported_overrides(items) -> list[str]:
    from suanli.infra.config import JobConfig

    cfg = JobConfig()
    out = []
    for item in items:
        section, key = item.split("=", 1)[0].split(".", 1)
        sec = getattr(cfg, section, None)
        if sec is not None and any(f.name.rstrip("_") == key for f in fields(sec)):
            out.append(item)
    return out


@dataclass
class MfuSpec:
    model: str = "tiny"
    seq_len: int = 256
    micro_batch: int = 4
    micro_batches: int = 0           # per data-parallel replica per step; 0: 1, or 2·pp with pipelining
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dp_mode: str = "fsdp"            # fsdp: dp shards (FSDP2); ddp: dp replicas
    schedule: str = "1f1b"
    stages_per_rank: int = 2         # interleaved-1f1b only
    dtype: str = "fp32"
    activation_checkpoint: str = "none"
    steps: int = 10
    warmup: int = 2
    profile_steps: int = 1           # extra profiled steps for the time breakdown; 0: none
    peak: str = "table"              # table | measured
    peak_tflops: float = 0.0         # > 0: the user's figure, overrides `peak`

    @property
    def nproc(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def m(self) -> int:
        return self.micro_batches or (2 * self.pp if self.pp > 1 else 1)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.m * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def label(self) -> str:
        dp = f"dp{self.dp}" + (f"({self.dp_mode})" if self.dp > 1 else "")
        pp = f"pp{self.pp}" + (f"({self.schedule})" if self.pp > 1 else "")
        return f"tp{self.tp} {pp} {dp} mb{self.micro_batch}x{self.m}"

    def validate(self) -> None:
        for k in ("seq_len", "micro_batch", "tp", "pp", "dp", "steps"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"--{k.replace('_', '-')}: must be >= 1, got {getattr(self, k)}")
        if self.warmup < 0 or self.profile_steps < 0 or self.micro_batches < 0:
            raise ValueError("--warmup, --profile-steps and --micro-batches must be >= 0")
        if self.peak not in PEAK_MODES:
            raise ValueError(f"--peak: '{self.peak}' is not one of {', '.join(PEAK_MODES)} (or give --peak-tflops)")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"--dp-mode: '{self.dp_mode}' is not one of {', '.join(DP_MODES)}")
        if self.peak_tflops < 0:
            raise ValueError(f"--peak-tflops: must be > 0, got {self.peak_tflops}")

    def overrides(self) -> list[str]:
        """The job config as `--set` items: the benchmark trains what `suanli train` would."""
        total = self.warmup + self.steps + self.profile_steps
        replicate, shard = (self.dp, 1) if self.dp_mode == "ddp" else (1, self.dp)
        return [
            f'model.preset="{self.model}"', f"train.seq_len={self.seq_len}", f"train.micro_batch={self.micro_batch}",
            f"train.global_batch={self.global_batch}", f"train.steps={total}", f'train.dtype="{self.dtype}"',
            f"train.peak_tflops={float(self.peak_tflops)}",
            f"data.synthetic_tokens={max(100_000, 2 * self.tokens_per_step)}",
            f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.dp_replicate={replicate}",
            f"parallel.dp_shard={shard}", f'parallel.pp_schedule="{self.schedule}"',
            f"parallel.pp_stages_per_rank={self.stages_per_rank}",
            f'parallel.activation_checkpoint="{self.activation_checkpoint}"',
        ] + supported_overrides(NO_CHECKPOINTS)

    @classmethod
    def from_dict(cls, d: dict) -> "MfuSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_peak(acc, dtype: str, mode: str, user_tflops: float, measured_flops: float | None = None
                 ) -> tuple[float | None, str]:
    """(peak FLOP/s per device, source). The user's figure wins; then a measurement when one
    was asked for; then the HAL table. No figure → (None, "unknown"), never a default."""
    if user_tflops and user_tflops > 0:
        return user_tflops * 1e12, "user"
    if mode == "measured":
        if not measured_flops or measured_flops <= 0:
            raise ValueError("--peak measured: the GEMM probe produced no rate")
        return measured_flops, "measured"
    flops = acc.peak_flops(dtype)
    if flops is None:
        return None, "unknown"
    return flops, f"table:{acc.device_name()}"


def summarize(spec: MfuSpec, step_times_s: list[float], world_size: int, flops_per_token: float,
              hw_flops_per_token: float, peak_flops: float | None, peak_source: str, **extra) -> dict:
    """The run's numbers from its per-step times (each already the slowest rank's)."""
    step = statistics.median(step_times_s)
    tokens_global = spec.tokens_per_step / step
    per_device = tokens_global / world_size
    achieved = achieved_flops_per_device(tokens_global, world_size, flops_per_token)
    return {
        "model": spec.model, "layout": spec.label(), "world_size": world_size,
        "tp": spec.tp, "pp": spec.pp, "dp": spec.dp, "dp_mode": spec.dp_mode, "schedule": spec.schedule,
        "seq_len": spec.seq_len, "micro_batch": spec.micro_batch, "micro_batches": spec.m,
        "global_batch": spec.global_batch, "dtype": spec.dtype, "activation_checkpoint": spec.activation_checkpoint,
        "steps": len(step_times_s), "warmup": spec.warmup,
        "step_time_s": step, "step_times_s": list(step_times_s),
        "tokens_per_step": spec.tokens_per_step,
        "tokens_per_s": tokens_global,
        "tokens_per_s_per_device": per_device,
        "flops_per_token": flops_per_token, "hardware_flops_per_token": hw_flops_per_token,
        "tflops_per_device": achieved / 1e12,
        "mfu": mfu(per_device, flops_per_token, peak_flops),
        "hfu": mfu(per_device, hw_flops_per_token, peak_flops),
        "peak_tflops": None if peak_flops is None else peak_flops / 1e12,
        "peak_source": peak_source,
        **extra,
    }


class _StepRecorder:
    """Trainer hooks: time every loop iteration, profile the last `profile_steps` ones."""

    def __init__(self, trainer, profile_from: int, on_device: bool) -> None:
        self.times: list[float] = []
        self.trainer_step_times: list[float] = []
        self.profile_from = profile_from   # 0-based index of the first profiled step
        self.on_device = on_device
        self.prof = None
        self.mark = None
        self._start = 0.0
        trainer.hooks.on_phase.append(self.on_phase)
        trainer.hooks.on_step_end.append(self.on_step_end)

    def on_phase(self, trainer, phase: str) -> None:
        if phase != "data":
            return
        if trainer.step == self.profile_from and self.prof is None:
            import torch.profiler as tp

            self.prof = tp.profile(activities=list(tp.supported_activities()) if self.on_device
                                   else [tp.ProfilerActivity.CPU])
            self.prof.__enter__()
        if self.prof is not None:
            from torch.profiler import record_function

            self.mark = record_function(STEP_MARK)
            self.mark.__enter__()
        self._start = time.perf_counter()

    def on_step_end(self, trainer, res) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.trainer_step_times.append(res.step_time_s)
        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None

    def breakdown(self) -> dict | None:
        if self.prof is None:
            return None
        self.prof.__exit__(None, None, None)
        b = breakdown_from_events(self.prof.events(), self.on_device)
        return b.as_dict() if b else None


MEASURED_PEAK_METHOD = ("bench/peak.py GEMM probe (quick shapes, best trial of >= 0.05 s) run on every rank at once "
                        "before and after training; per rank the better probe, then the mean over ranks")


def measure_rank_peak(ctx, dtype: str) -> float:
    """GEMM peak measured on every rank at once (so each sees the contention it trains
    under), averaged over ranks: MFU then compares the job's total to the machine's."""
    import torch
    import torch.distributed as dist

    from suanli.bench.peak import measure_peak, sizes_for

    if ctx.world_size > 1:
        dist.barrier()
    m = measure_peak(dtype, ctx.accelerator, sizes=sizes_for(ctx.accelerator, quick=True), min_time_s=0.05,
                     trials=3, device=ctx.device)
    t = torch.tensor([m.flops], dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def rank_main(d: dict) -> dict | None:
    """Rank body (run by bench/ranks.py on every rank); rank 0 returns the result."""
    import torch
    import torch.distributed as dist

    from suanli.infra.config import load_config, model_config
    from suanli.infra.distributed import shutdown
    from suanli.infra.pipeline import stages_per_rank
    from suanli.infra.trainer import Trainer

    spec = MfuSpec.from_dict(d)
    run_dir = tempfile.mkdtemp(prefix="suanli-bench-mfu-")
    try:
        cfg = load_config(None, spec.overrides())
        cfg.train.run_dir = os.path.join(run_dir, "run")
        trainer = Trainer(cfg)
        ctx, acc = trainer.ctx, trainer.acc
        probe = spec.peak == "measured" and not spec.peak_tflops
        measured = measure_rank_peak(ctx, spec.dtype) if probe else None
        acc.reset_peak_memory_stats()
        rec = _StepRecorder(trainer, spec.warmup + spec.steps if spec.profile_steps else -1,
                            on_device=acc.device_type != "cpu")
        trainer.fit()
        per_rank_breakdown = rec.breakdown()
        if probe:
            measured = max(measured, measure_rank_peak(ctx, spec.dtype))
        peak, source = resolve_peak(acc, spec.dtype, spec.peak, spec.peak_tflops, measured)

        timed = slice(spec.warmup, spec.warmup + spec.steps)
        # A step ends when its slowest rank does.
        times = torch.tensor(rec.times[timed] + rec.trainer_step_times[timed], dtype=torch.float64)
        mem = torch.tensor([float(acc.max_memory_allocated())], dtype=torch.float64)
        gathered: list = [None] * ctx.world_size
        if ctx.world_size > 1:
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
            dist.all_gather_object(gathered, per_rank_breakdown)
        else:
            gathered = [per_rank_breakdown]
        if ctx.rank != 0:
            return None
        mc = model_config(cfg)
        n = spec.steps
        result = summarize(
            spec, times[:n].tolist(), ctx.world_size, model_flops_per_token(mc, spec.seq_len),
            hardware_flops_per_token(mc, spec.seq_len, spec.activation_checkpoint), peak, source,
            trainer_step_time_s=statistics.median(times[n:].tolist()),
            peak_memory_bytes=int(mem.item()),
            device=acc.device_name(), accelerator=acc.name, data_parallel=trainer.pmodel.data_parallel,
            threads_per_rank=torch.get_num_threads() if acc.device_type == "cpu" else None,
        )
        b = mean_breakdown(gathered)
        per_rank = stages_per_rank(spec.schedule, spec.stages_per_rank) if spec.pp > 1 else 1
        result["peak_method"] = MEASURED_PEAK_METHOD if source == "measured" else None
        result["breakdown"] = b
        result["breakdown_method"] = METHOD if b else None
        result["bubble"] = {"measured": b["pipeline_wait"] if b else None,
                            "formula": bubble_formula(spec.schedule, spec.pp, spec.m, per_rank)}
        return result
    finally:
        shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def run_mfu(spec: MfuSpec, timeout_s: float = 1800) -> dict:
    """One benchmark run as spec.nproc local processes (one process is still launched, so
    the benchmark's process group never lives in the caller)."""
    from suanli.bench.ranks import run_ranks

    spec.validate()
    return run_ranks("mfu", asdict(spec), spec.nproc, timeout_s=timeout_s)


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.2f}%"


def format_mfu(r: dict) -> str:
    lines = [
        f"model {r['model']} | {r['layout']} | seq {r['seq_len']} | {r['dtype']} | {r['world_size']} x {r['device']}",
        f"step time     {1000 * r['step_time_s']:.1f} ms (median of {r['steps']} steps after {r['warmup']} warm-up; "
        f"slowest rank per step; trainer's own train_step {1000 * r['trainer_step_time_s']:.1f} ms)",
        f"tokens/s      {r['tokens_per_s']:,.0f} global | {r['tokens_per_s_per_device']:,.0f} per device",
        f"achieved      {r['tflops_per_device']:.4f} TFLOP/s per device "
        f"({r['flops_per_token'] / 1e6:.2f} MFLOP/token, 6N + 12LHQT)",
    ]
    if r["mfu"] is None:
        lines.append(f"MFU unknown   no peak FLOPS for '{r['device']}' (peak source: {r['peak_source']}); "
                     f"use --peak measured or --peak-tflops X")
    else:
        lines.append(f"MFU           {_pct(r['mfu'])} | HFU {_pct(r['hfu'])} against {r['peak_tflops']:.4f} TFLOP/s "
                     f"per device (peak source: {r['peak_source']})")
    on_cpu = "; process RSS high-water mark on CPU, probe buffers included" if r["accelerator"] == "cpu" else ""
    lines.append(f"peak memory   {r['peak_memory_bytes'] / 2 ** 20:,.1f} MiB (max over ranks{on_cpu})")
    b = r.get("breakdown")
    if b:
        lines.append(f"time went to  compute {_pct(b['compute'])} | exposed comm {_pct(b['exposed_comm'])} | "
                     f"pipeline wait {_pct(b['pipeline_wait'])} | other {_pct(b['other'])} "
                     f"(profiled {b['steps']} step(s), mean of {b['ranks']} rank(s))")
    if r["pp"] > 1:
        bub = r["bubble"]
        formula = "n/a for this schedule" if bub["formula"] is None else _pct(bub["formula"])
        lines.append(f"pipeline      bubble measured {_pct(bub['measured'])} vs formula (p-1)/(m+p-1) {formula}")
    return "\n".join(lines)


__all__ = ["MfuSpec", "run_mfu", "resolve_peak", "summarize", "format_mfu", "rank_main"]
