"""`suanli bench overhead`: suanli's training loop vs the same model trained by plain PyTorch.

Same processes, same model class and initial weights, same tokens per step, same AdamW
settings; the difference is everything suanli adds around them. The plain side is written
directly with torch: `DistributedDataParallel(model)`, or `fully_shard` on every block and
the root, `torch.optim.AdamW`, `LambdaLR`, `clip_grad_norm_`, `loss.item()` for logging —
what a competent user writes by hand.

Interleaving: suanli's `Trainer.fit()` runs as usual and its hooks run one plain step
beside each suanli step — after it on even steps, before it on odd ones (S P P S S P ...)
— so the two alternate in the same processes, machine noise (other jobs, frequency
changes) hits both alike, and neither side always runs right after the other's optimizer.
suanli's step is its whole loop iteration (data, forward/backward, sync, clip, optimizer,
loss all-reduce, metrics, guards: "data" phase hook → step-end hook); the plain step is
timed the same way around its own loop body. Per step the slowest rank counts. Reported:
medians over the timed steps, their ratio, and the median (and interquartile range) of the
per-pair ratios — each suanli step over the plain step beside it, so a burst of outside
load cancels; the targets are judged on the paired median.
Where the difference goes: the trainer's phase hooks (data, forward, backward, optimizer)
and matching timestamps in the plain loop split both steps into data / forward / backward
/ rest (clip, optimizer, loss reduction, metrics), host clock, rank 0.
MFU uses a GEMM peak measured on every rank at once before and after training, the better
of the two (bench/peak.py); the MFU ratio is the inverse of the step-time ratio.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# layout -> (processes, data-parallel kind); the dp=2 layouts are the target.
LAYOUTS: dict[str, tuple[int, str]] = {"single": (1, "none"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}

# target per layout: ("mfu_ratio", x) means suanli MFU >= x * plain MFU;
# ("overhead", x) means suanli step time <= (1 + x) * plain step time.
TARGETS: dict[str, tuple[str, float]] = {"single": ("mfu_ratio", 0.90), "ddp": ("overhead", 0.05),
                                         "fsdp": ("overhead", 0.05)}


@dataclass
class OverheadSpec:
    model: str = "tiny"
    layout: str = "single"
    seq_len: int = 128
    batch: int = 8             # global sequences per step
    steps: int = 20            # timed steps per side
    warmup: int = 3
    dtype: str = "fp32"
    lr: float = 3e-4
    seed: int = 0
    # 1: every rank single-threaded, so no OpenMP barrier spins; on a machine shared with
    # other jobs a multi-threaded rank turns their load into 10x step-time swings. 0: the
    # launcher's default (cores / processes).
    threads: int = 1
    ablate: str = ""           # comma-separated ABLATIONS applied to suanli's trainer (investigation)

    @property
    def nproc(self) -> int:
        return LAYOUTS[self.layout][0]

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layouts: '{self.layout}' is not one of {', '.join(LAYOUTS)}")
        if self.batch % self.nproc:
            raise ValueError(f"--batch: {self.batch} is not divisible by {self.nproc} processes")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")
        unknown = set(filter(None, self.ablate.split(","))) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"--ablate: unknown {sorted(unknown)}; known: {', '.join(ABLATIONS)}")

    def overrides(self) -> list[str]:
        from suanli.bench.mfu_run import NO_CHECKPOINTS, supported_overrides

        dp, kind = LAYOUTS[self.layout]
        replicate, shard = (dp, 1) if kind == "ddp" else (1, dp)
        return [f'model.preset="{self.model}"', f"train.seq_len={self.seq_len}", f"train.global_batch={self.batch}",
                f"train.micro_batch={self.batch // dp}", f"train.steps={self.warmup + self.steps}",
                f'train.dtype="{self.dtype}"', f"train.lr={self.lr}", f"train.seed={self.seed}",
                f"data.synthetic_tokens={max(100_000, 2 * self.batch * self.seq_len)}",
                f"parallel.dp_replicate={replicate}", f"parallel.dp_shard={shard}",
                *supported_overrides(NO_CHECKPOINTS)]


def _local_loss_only(trainer) -> None:
    """Log this rank's loss (what the plain loop logs) instead of all-reducing it every step."""
    trainer._global_mean_loss = lambda local_loss: float(local_loss.item())


def _no_rank0_logging(trainer) -> None:
    """No metrics.jsonl line, progress line or summary from rank 0."""
    trainer.is_logger = False


# name -> change made to suanli's Trainer from outside (it is never edited), to measure
# what one of its per-step duties costs.
ABLATIONS = {"loss-allreduce": _local_loss_only, "logging": _no_rank0_logging}


class PlainTorch:
    """The baseline: the same model trained by a hand-written torch loop."""

    def __init__(self, spec: OverheadSpec, model_cfg, device, suanli_optimizer) -> None:
        import math

        import torch
        import torch.distributed as dist

        from suanli.infra.model import Transformer

        dp, kind = LAYOUTS[spec.layout]
        self.kind, self.device, self.seq_len = kind, device, spec.seq_len
        self.local_batch = spec.batch // dp
        torch.manual_seed(spec.seed)
        model = Transformer(model_cfg).to(device)
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        elif kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            for block in model.layers.values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        # Same AdamW implementation flags (fused / foreach) as suanli picked: the comparison
        # is about the loop around the optimizer, not about which kernel it runs.
        impl = {k: suanli_optimizer.defaults.get(k) for k in ("fused", "foreach")}
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=spec.lr, betas=(0.9, 0.95), eps=1e-8, **impl)
        warm, total = 10, spec.warmup + spec.steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (
                1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
        gen = torch.Generator().manual_seed(spec.seed + (dist.get_rank() if dist.is_initialized() else 0))
        self.tokens = torch.randint(0, model_cfg.vocab_size, (200_000,), generator=gen)
        self.gen = gen

    def step(self, stamp) -> float:
        import torch
        import torch.nn.functional as F

        stamp("data")
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.local_batch,), generator=self.gen)
        chunk = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()]).to(self.device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        stamp("forward")
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(0, 1))
        stamp("backward")
        loss.backward()
        stamp("optimizer")
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


PHASES = ("data", "forward", "backward", "optimizer")


class PhaseClock:
    """First timestamp of each phase in one step; durations run to the next phase (the last,
    "optimizer", to the step's end, so it holds everything after backward)."""

    def __init__(self) -> None:
        self.stamps: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def __call__(self, phase: str) -> None:
        self.stamps.setdefault(phase, time.perf_counter())

    def end(self) -> None:
        t = [self.stamps.get(p) for p in PHASES] + [time.perf_counter()]
        if None not in t:
            self.steps.append({p: t[i + 1] - t[i] for i, p in enumerate(PHASES)})
        self.stamps = {}

    def medians(self, timed: slice) -> dict[str, float]:
        rows = self.steps[timed]
        return {p: statistics.median(r[p] for r in rows) for p in PHASES} if rows else {}


class Interleaver:
    """Trainer hooks: time suanli's loop iteration, then run and time one plain step."""

    def __init__(self, trainer, plain: PlainTorch) -> None:
        self.plain, self.acc = plain, trainer.acc
        self.suanli: list[float] = []
        self.suanli_train_step: list[float] = []
        self.plain_times: list[float] = []
        self.suanli_phases, self.plain_phases = PhaseClock(), PhaseClock()
        self._start = 0.0
        trainer.hooks.on_phase.append(self.on_phase)
        trainer.hooks.on_step_end.append(self.on_step_end)

    def _plain_step(self) -> None:
        self.acc.synchronize()
        start = time.perf_counter()
        self.plain.step(self.plain_phases)
        self.acc.synchronize()
        self.plain_times.append(time.perf_counter() - start)
        self.plain_phases.end()

    @staticmethod
    def _plain_first(step: int) -> bool:
        # Pairs alternate S P, P S, S P, ...: whatever one side leaves behind (caches, the
        # allocator, the other model's optimizer having just run) hits both sides equally.
        return step % 2 == 1

    def on_phase(self, trainer, phase: str) -> None:
        if phase == "data":
            if self._plain_first(len(self.suanli)):
                self._plain_step()
            self._start = time.perf_counter()
        self.suanli_phases(phase)

    def on_step_end(self, trainer, res) -> None:
        step = len(self.suanli)
        self.suanli.append(time.perf_counter() - self._start)
        self.suanli_phases.end()
        self.suanli_train_step.append(res.step_time_s)
        if not self._plain_first(step):
            self._plain_step()


def rank_main(d: dict) -> dict | None:
    import torch
    import torch.distributed as dist

    from suanli.bench.flops import mfu, model_flops_per_token
    from suanli.bench.mfu_run import measure_rank_peak
    from suanli.infra.config import load_config
    from suanli.infra.distributed import shutdown
    from suanli.infra.trainer import Trainer

    spec = OverheadSpec(**d)
    run_dir = tempfile.mkdtemp(prefix="suanli-bench-overhead-")
    try:
        cfg = load_config(None, spec.overrides())
        cfg.train.run_dir = os.path.join(run_dir, "run")
        trainer = Trainer(cfg)
        ctx = trainer.ctx
        for name in filter(None, spec.ablate.split(",")):
            ABLATIONS[name](trainer)
        plain = PlainTorch(spec, trainer.model_cfg, ctx.device, trainer.optimizer)
        peak = measure_rank_peak(ctx, spec.dtype)
        inter = Interleaver(trainer, plain)
        trainer.fit()
        peak = max(peak, measure_rank_peak(ctx, spec.dtype))
        timed = slice(spec.warmup, spec.warmup + spec.steps)
        t = torch.tensor([inter.suanli[timed], inter.plain_times[timed], inter.suanli_train_step[timed]],
                         dtype=torch.float64)
        if ctx.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
        if ctx.rank != 0:
            return None
        suanli_t, plain_t, train_step_t = (row.tolist() for row in t)
        fpt = model_flops_per_token(trainer.model_cfg, spec.seq_len)
        tokens = spec.batch * spec.seq_len

        def side(times: list[float]) -> dict:
            med = statistics.median(times)
            per_device = tokens / med / ctx.world_size
            return {"median_step_s": med, "min_step_s": min(times), "step_times_s": times,
                    "tokens_per_s_per_device": per_device, "mfu": mfu(per_device, fpt, peak)}

        s, p = side(suanli_t), side(plain_t)
        ratio = s["median_step_s"] / p["median_step_s"]
        pairs = [a / b for a, b in zip(suanli_t, plain_t)]
        paired = statistics.median(pairs)
        q1, _, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (paired, paired, paired)
        target_kind, target = TARGETS[spec.layout]
        mfu_ratio = s["mfu"] / p["mfu"]
        met = 1 / paired >= target if target_kind == "mfu_ratio" else paired - 1 <= target
        return {**asdict(spec), "nproc": ctx.world_size, "data_parallel": trainer.pmodel.data_parallel,
                "threads_per_rank": torch.get_num_threads(), "device": trainer.acc.device_name(),
                "peak_tflops_measured": peak / 1e12, "flops_per_token": fpt,
                "suanli": s, "plain": p, "suanli_train_step_median_s": statistics.median(train_step_t),
                "step_time_ratio": ratio, "paired_ratio_median": paired, "paired_ratio_iqr": [q1, q3],
                "overhead": paired - 1, "mfu_ratio": mfu_ratio, "paired_mfu_ratio": 1 / paired,
                "phases_s": {"suanli": inter.suanli_phases.medians(timed),
                             "plain": inter.plain_phases.medians(timed)},
                "target": f"suanli MFU >= {target:.0%} of plain" if target_kind == "mfu_ratio"
                else f"overhead <= {target:.0%}", "target_met": bool(met)}
    finally:
        shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def run_overhead(specs: list[OverheadSpec], progress: bool = True) -> list[dict]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from suanli.bench.ranks import run_ranks

    for s in specs:
        s.validate()
    results = []
    with Progress(TextColumn("overhead"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=Console(stderr=True, quiet=not progress)) as bar:
        task = bar.add_task("", total=len(specs))
        for s in specs:
            bar.update(task, description=f"{s.model} {s.layout}")
            results.append(run_ranks("overhead", asdict(s), s.nproc, timeout_s=1800,
                                     threads_per_rank=s.threads or None))
            bar.advance(task)
    return results


def overhead_markdown(results: list[dict]) -> str:
    out = ["| model | layout | procs x threads | suanli step (ms) | plain step (ms) | ratio of medians | "
           "paired ratio: median [IQR] | overhead | suanli MFU | plain MFU | MFU ratio (paired) | target | met |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        s, p = r["suanli"], r["plain"]
        variant = f", without {r['ablate']}" if r.get("ablate") else ""
        out.append(f"| {r['model']} | {r['layout']} ({r['data_parallel']}{variant}) | "
                   f"{r['nproc']} x {r['threads_per_rank']} | "
                   f"{1000 * s['median_step_s']:.1f} | {1000 * p['median_step_s']:.1f} | {r['step_time_ratio']:.3f} | "
                   f"{r['paired_ratio_median']:.3f} [{r['paired_ratio_iqr'][0]:.3f}, {r['paired_ratio_iqr'][1]:.3f}] | "
                   f"{100 * r['overhead']:+.1f}% | {100 * s['mfu']:.2f}% | "
                   f"{100 * p['mfu']:.2f}% | {r['paired_mfu_ratio']:.3f} | {r['target']} | "
                   f"{'yes' if r['target_met'] else 'NO'} |")
    out += ["", "Where the time goes (median ms per phase, rank 0; rest = clip, optimizer, loss reduction, metrics, "
            "guards):", "", "| model | layout | side | data | forward | backward | rest | sum |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for side in ("suanli", "plain"):
            ph = r["phases_s"][side]
            if ph:
                cells = " | ".join(f"{1000 * ph[k]:.1f}" for k in PHASES)
                variant = f" (without {r['ablate']})" if r.get("ablate") and side == "suanli" else ""
                total = 1000 * sum(ph.values())
                out.append(f"| {r['model']} | {r['layout']} | {side}{variant} | {cells} | {total:.1f} |")
    return "\n".join(out)


def format_overhead(results: list[dict]) -> str:
    return overhead_markdown(results) + "\n\nmethod: " + " ".join((__doc__ or "").split("\n\n")[2].split())


def write_overhead_report(results: list[dict], path: Path, command: str, machine: dict) -> Path:
    """`machine`: machine_info() taken before the runs (its load average is the one at start)."""
    from suanli.bench.report import machine_markdown

    r0 = results[0] if results else {}
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n\n".join([
        "# suanli overhead vs plain PyTorch", machine_markdown(machine) + f"\n| load average at end | {load_end} |",
        f"command: `{command}`",
        f"per run: seq_len {r0.get('seq_len')}, {r0.get('batch')} sequences per step (global), "
        f"{r0.get('warmup')} warm-up + {r0.get('steps')} timed steps per side, dtype {r0.get('dtype')}",
        overhead_markdown(results), "## Method", " ".join((__doc__ or "").split("\n\n", 1)[1].split()),
    ]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    # Every step's time, both sides, beside the table.
    path.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "results": results},
                                                    indent=2))
    return path


__all__ = ["OverheadSpec", "run_overhead", "overhead_markdown", "format_overhead", "write_overhead_report",
           "LAYOUTS", "TARGETS"]
