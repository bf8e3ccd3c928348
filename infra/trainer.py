"""The training loop: data → forward/backward (pipeline schedule or micro-batch loop) →
gradient sync → clip → optimizer → metrics.

Checkpointing, heartbeats and guards plug in as plain callables (`Trainer.hooks`), so
they never need to edit this loop. `fit` first resumes from the newest valid checkpoint
in the run directory (fault/recovery.py: auto-resume, periodic async saves, loss-guard
rollback). Rank 0 writes `metrics.jsonl` (one JSON object per step, appended across
restarts) and `summary.json` in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from suanli.infra.config import JobConfig, model_config, to_toml
from suanli.infra.data import DistributedBatchSampler, TokenDataset, make_batch, split_microbatches, synthetic_tokens
from suanli.infra.distributed import ParallelConfig, ParallelContext, init
from suanli.infra.model import Transformer, cross_entropy_loss
from suanli.infra.optim import build_lr_scheduler, build_optimizer
from suanli.infra.parallelize import ParallelModel, parallelize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class StepResult:
    step: int              # 1-based number of optimizer steps done
    loss: float
    grad_norm: float
    lr: float
    step_time_s: float
    tokens_per_s: float    # global tokens (all data-parallel replicas) per second
    mfu: float | None      # None when the device's peak is unknown
    comm_bytes: int = 0    # gradient-sync bytes this rank sent (low-bandwidth options count theirs)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Hooks:
    """Plain callables other subsystems register; each gets the trainer as its argument."""

    on_phase: list[Callable[["Trainer", str], None]] = field(default_factory=list)
    on_step_end: list[Callable[["Trainer", StepResult], None]] = field(default_factory=list)
    on_fit_end: list[Callable[["Trainer"], None]] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: JobConfig, ctx: ParallelContext | None = None) -> None:
        self.cfg = cfg
        t, p = cfg.train, cfg.parallel
        hetero = bool(cfg.hetero.groups)
        if hetero:  # one job across device types: per-vendor groups joined by a host bridge
            from suanli.infra.hetero import build_hetero

            self.ctx, hetero_model = build_hetero(cfg)
        else:
            self.ctx = ctx or init(ParallelConfig(p.tp, p.pp, p.dp_replicate, p.dp_shard))
        self.acc = self.ctx.accelerator
        self.hooks = Hooks()
        self.step = 0
        self.run_dir = Path(t.run_dir)
        self.is_logger = self.ctx.rank == 0

        dp = self.ctx.dp_size
        if t.global_batch % dp:
            raise ValueError(f"train.global_batch: {t.global_batch} is not divisible by the data-parallel degree {dp}")
        self.local_batch = t.global_batch // dp
        if self.local_batch % t.micro_batch:
            raise ValueError(f"train.micro_batch: {t.micro_batch} does not divide the per-replica batch "
                             f"{self.local_batch} (train.global_batch={t.global_batch} / dp={dp})")
        self.n_micro = self.local_batch // t.micro_batch
        self.dtype = DTYPES[t.dtype]

        # Every rank builds the same full model from the same seed, so any layout starts
        # from identical weights; parallelize() then keeps only this rank's shard.
        self.model_cfg = model_config(cfg)
        if t.seq_len > self.model_cfg.max_seq_len:
            raise ValueError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len={self.model_cfg.max_seq_len}")
        torch.manual_seed(t.seed)
        if hetero:
            self.pmodel = hetero_model
        else:
            model = Transformer(self.model_cfg).to(self.ctx.device)
            self.pmodel: ParallelModel = parallelize(
                model, self.ctx, seq_len=t.seq_len, n_microbatches=self.n_micro, pp_schedule=p.pp_schedule,
                pp_layers=p.pp_layers, pp_stages_per_rank=p.pp_stages_per_rank,
                activation_checkpoint=p.activation_checkpoint, dtype=self.dtype)
        self.params = list(self.pmodel.parameters())
        self.optimizer = build_optimizer(self.acc, self.params, t.lr, t.weight_decay)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)

        tokens = (synthetic_tokens(cfg.data.synthetic_tokens, self.model_cfg.vocab_size, t.seed)
                  if cfg.data.synthetic else cfg.data.path)
        self.dataset = TokenDataset(tokens, t.seq_len, vocab_size=self.model_cfg.vocab_size)
        self.sampler = DistributedBatchSampler(len(self.dataset), t.global_batch, self.ctx.dp_rank, dp, seed=t.seed)
        self._batches = iter(self.sampler)

        from suanli.bench.flops import model_flops_per_token

        self.flops_per_token = model_flops_per_token(self.model_cfg, t.seq_len)
        self.peak_flops, self.peak_source = self._peak()

        from suanli.fault.recovery import Recovery

        # Checkpoints (resume, periodic async saves) and the loss guard, via self.hooks.
        self.recovery = Recovery(self)
        from suanli.infra.lowbw import CommOptions
        from suanli.infra.lowbw.options import CommCheckpoint

        self.comm, self.comm_bytes = CommOptions(), 0  # plain sync until fit() attaches [comm] options
        # The comm options' per-rank state (residuals, DiLoCo replicas) rides in checkpoints
        # through this slot; fit() binds the options to it after resuming.
        self.comm_checkpoint = CommCheckpoint()
        self.recovery.state.per_rank["comm"] = self.comm_checkpoint

    # ---- setup helpers ----
    def _peak(self) -> tuple[float | None, str]:
        t = self.cfg.train
        if t.peak_tflops > 0:
            return t.peak_tflops * 1e12, "user"
        if t.peak_tflops < 0:
            return self._measured_peak(), "measured"
        peak = self.acc.peak_flops(t.dtype)
        if peak is not None:
            return peak, f"table:{self.acc.device_name()}"
        return None, "unknown"

    def _comm_options(self):
        """Low-bandwidth gradient sync ([comm]); the heterogeneous layout has its own bridge codecs."""
        from suanli.infra.lowbw import CommOptions, attach_comm_options

        return CommOptions() if self.cfg.hetero.groups else attach_comm_options(self)

    def _measured_peak(self) -> float:
        """Dense GEMM peak measured on every rank at once (each sees the contention it will
        train under), averaged over ranks so every rank reports the same MFU. Measured once
        per run: a resumed attempt reuses the figure (and its seconds) from peak.json."""
        from suanli.bench.peak import measure_peak, sizes_for

        cache = self.run_dir / "peak.json"
        key = {"dtype": self.cfg.train.dtype, "device": self.acc.device_name(), "world_size": self.ctx.world_size}
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return float(saved["flops"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        m = measure_peak(self.cfg.train.dtype, self.acc, sizes=sizes_for(self.acc, quick=True), min_time_s=0.05,
                         trials=3, device=self.ctx.device)
        flops = torch.tensor([m.flops], dtype=torch.float64)
        if self.ctx.world_size > 1:
            dist.all_reduce(flops)
        peak = float(flops.item()) / self.ctx.world_size
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "peak.json.tmp").write_text(json.dumps({"key": key, "flops": peak}))
            (self.run_dir / "peak.json.tmp").replace(cache)
        return peak

    def _phase(self, name: str) -> None:
        for h in self.hooks.on_phase:
            h(self, name)

    # ---- one optimizer step ----
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """Forward and backward over this replica's batch, then clip and step. Returns the
        global mean loss and the gradient norm."""
        tp_loss = torch.distributed.tensor.parallel.loss_parallel if self.pmodel.tensor_parallel else contextlib.nullcontext
        autocast = (torch.autocast(self.acc.device_type, dtype=self.dtype)
                    if self.dtype != torch.float32 and self.pmodel.data_parallel not in ("fsdp", "hsdp")
                    else contextlib.nullcontext())
        self._phase("forward")
        local_loss = torch.zeros((), dtype=torch.float32)
        if self.pmodel.pipeline is not None:
            with tp_loss(), autocast:
                losses = self.pmodel.pipeline.step(inputs, targets)
            if self.pmodel.pipeline.has_last:
                local_loss = torch.stack([_plain(l.detach()).float() for l in losses]).mean().cpu()
        else:
            model = self.pmodel.modules[0]
            for i, (x, y) in enumerate(split_microbatches(inputs, targets, self.cfg.train.micro_batch)):
                # comm options that compress or defer gradient sync do it themselves, after backward
                last = i == self.n_micro - 1 and not self.comm.skip_builtin_sync
                with self._grad_sync(model, last), tp_loss(), autocast:
                    loss = cross_entropy_loss(model(x), y) / self.n_micro
                    self._phase("backward")
                    loss.backward()
                local_loss += _plain(loss.detach()).float().cpu()
        self.comm_bytes = self.comm.after_backward(self.params)
        self._phase("optimizer")
        grad_norm = self.pmodel.clip_grad_norm_(self.cfg.train.grad_clip)
        self.optimizer.step()
        self.comm_bytes += self.comm.after_optimizer_step(self.step + 1, self.params)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._global_mean_loss(local_loss), grad_norm

    def _grad_sync(self, model, last: bool):
        """Reduce gradients only on the last micro-batch of a step."""
        if self.pmodel.data_parallel == "ddp" and not last:
            return model.no_sync()
        if self.pmodel.data_parallel in ("fsdp", "hsdp"):
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _global_mean_loss(self, local_loss: torch.Tensor) -> float:
        # Only one rank per data-parallel replica holds the loss: the one running the last
        # pipeline stage (pp rank 0 under the V schedule), at tp rank 0. Summing over the
        # world and dividing by dp gives the global mean.
        pipe = self.pmodel.pipeline
        holds = (pipe.has_last if pipe is not None else True) and self.ctx.tp_rank == 0
        t = (local_loss if holds else torch.zeros(())).reshape(1).float()
        if self.ctx.world_size > 1:
            dist.all_reduce(t)
        return t.item() / self.ctx.dp_size

    # ---- the loop ----
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._phase("data")
        try:
            indices = next(self._batches)
        except StopIteration:
            self._batches = iter(self.sampler)
            indices = next(self._batches)
        inputs, targets = make_batch(self.dataset, indices)
        return inputs.to(self.ctx.device), targets.to(self.ctx.device)

    def fit(self) -> list[StepResult]:
        t = self.cfg.train
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.cfg))
        self.recovery.resume()
        self.comm = self._comm_options()  # after resume: DiLoCo continues its schedule from self.step
        if self.step >= t.steps:
            if self.is_logger:
                print(f"run {self.run_dir} is complete: its newest valid checkpoint is step {self.step} of "
                      f"{t.steps}; nothing to do (raise train.steps to train further)", flush=True)
            return []
        self.pmodel.train()
        results = []
        progress = _Progress(t.steps, self.is_logger, self.peak_source)
        metrics = open(self.run_dir / "metrics.jsonl", "a") if self.is_logger else None
        try:
            while self.step < t.steps:
                inputs, targets = self.next_batch()
                self.acc.synchronize()
                start = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss, grad_norm = self.train_step(inputs, targets)
                self.acc.synchronize()
                dt = time.perf_counter() - start
                self.step += 1
                tps = t.global_batch * t.seq_len / dt
                res = StepResult(self.step, loss, grad_norm, lr, dt, tps, self._mfu(tps), self.comm_bytes)
                results.append(res)
                if metrics is not None:
                    # wall-clock time of the line: recovery is measured across processes and restarts
                    metrics.write(json.dumps({**res.as_dict(), "time": round(time.time(), 4)}) + "\n")
                    metrics.flush()
                progress.update(res)
                for h in self.hooks.on_step_end:
                    h(self, res)
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
        for h in self.hooks.on_fit_end:
            h(self)
        if self.is_logger:
            self.write_summary(results, **self.recovery.summary_fields())
        return results

    def _mfu(self, tokens_per_s_global: float) -> float | None:
        from suanli.bench.flops import mfu

        return mfu(tokens_per_s_global / self.ctx.world_size, self.flops_per_token, self.peak_flops)

    def write_summary(self, results: list[StepResult], **extra) -> dict:
        timed = results[1:] or results  # the first step pays one-off warm-up costs
        summary = {
            "final_loss": results[-1].loss if results else None,
            "first_loss": results[0].loss if results else None,
            "steps": self.step,
            "tokens_per_s": sum(r.tokens_per_s for r in timed) / max(1, len(timed)),
            "mfu": (sum(r.mfu for r in timed) / len(timed)) if timed and timed[0].mfu is not None else None,
            "peak_source": self.peak_source,
            "world_size": self.ctx.world_size,
            "parallel": self.ctx.describe()["parallel"],
            "restarts": 0,
            "recoveries": [],
            "skipped_batches": [],
            **extra,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The value of a loss that may be a replicated DTensor (loss parallel)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class _Progress:
    """A rich progress bar on a terminal; plain log lines otherwise (CI, log files, pipes)."""

    def __init__(self, total: int, enabled: bool, peak_source: str) -> None:
        self.enabled, self.total, self.peak_source = enabled, total, peak_source
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, info="")
            self.bar.start()

    @staticmethod
    def describe(r: StepResult) -> str:
        mfu = f"{100 * r.mfu:.2f}%" if r.mfu is not None else "unknown"
        return f"loss {r.loss:.4f} | {r.tokens_per_s:,.0f} tok/s | MFU {mfu}"

    def update(self, r: StepResult) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=r.step, info=self.describe(r))
        else:
            print(f"step {r.step}/{self.total} | {self.describe(r)} | grad_norm {r.grad_norm:.3f} | "
                  f"{r.step_time_s * 1000:.0f} ms", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
