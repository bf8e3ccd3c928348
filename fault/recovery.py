"""Fault tolerance for the `Trainer`: auto-resume, periodic async checkpoints, and the loss
guard's rollback — attached through the trainer's hooks so the loop itself stays plain.

- `resume()` (called at the start of `Trainer.fit`): load the newest valid checkpoint of
  `<run_dir>/checkpoints`, say so, and log it to `events.jsonl` (with every checkpoint it
  skipped and why).
- after each step: the guard judges the step; on an anomaly with action "rollback" the run
  returns to the newest valid checkpoint at least `rollback_steps` before it, skips
  `skip_batches` batches of data, logs both, and continues; past `max_rollbacks` within
  `rollback_window` steps it stops with an error for a person. Otherwise, a checkpoint is
  saved every `every_steps` steps and at the last one.
- `summary_fields()`: restarts, recoveries (with seconds) and skipped batches, counted from
  `events.jsonl` so they add up across process restarts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from suanli.fault.checkpoint import Checkpointer, TrainState
from suanli.fault.checkpoint.manifest import STEP_RE, fsync_dir, scan
from suanli.fault.events import append_event, read_events
from suanli.fault.guard import Anomaly, GuardConfig, GuardError, RollbackBudget, SpikeGuard


def guard_config(cfg) -> GuardConfig:
    f = cfg.fault
    return GuardConfig(z=f.spike_z, ema=f.spike_ema, history=f.spike_history, min_history=f.spike_min_history,
                       action=f.spike_action, rollback_steps=f.rollback_steps, skip_batches=f.skip_batches,
                       max_rollbacks=f.max_rollbacks, window=f.rollback_window)


class Recovery:
    """Checkpointing and the loss guard for one `Trainer` (construct on every rank)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        cfg = trainer.cfg
        c = cfg.checkpoint
        self.run_dir: Path = trainer.run_dir
        self.ckpt = Checkpointer(c.dir or self.run_dir / "checkpoints", c.every_steps, c.keep_last, c.keep_every,
                                 async_save=c.async_)
        self.guard_cfg = guard_config(cfg)
        self.guard = SpikeGuard(self.guard_cfg) if cfg.fault.spike_guard else None
        self.budget = RollbackBudget(self.guard_cfg.max_rollbacks, self.guard_cfg.window)
        stateful = {"lr_scheduler": trainer.lr_scheduler, "sampler": trainer.sampler}
        if self.guard is not None:
            stateful["guard"] = self.guard
        ctx = trainer.ctx
        layout = {"world_size": ctx.world_size, "parallel": asdict(ctx.parallel),
                  "pp_schedule": cfg.parallel.pp_schedule, "stage_layers": list(trainer.pmodel.stage_layers)}
        self.state = TrainState(trainer.pmodel.modules, trainer.optimizer, stateful,
                                meta={"layout": layout, "model": trainer.model_cfg.to_dict(), "config": cfg.to_dict()},
                                accelerator=trainer.acc)
        trainer.hooks.on_step_end += [self.check_step, self.maybe_save]
        trainer.hooks.on_fit_end.append(lambda _trainer: self.ckpt.wait())

    # ------------------------------------------------------------------ resume

    def resume(self) -> int | None:
        """Load the newest valid checkpoint, if any; returns its step."""
        if not self.trainer.cfg.checkpoint.resume:
            return None
        start = time.perf_counter()
        self._check_model_matches()
        loaded = self.ckpt.resume(self.state)
        # The Checkpointer has logged each skipped checkpoint with its reason (a warning).
        skipped = [{"name": c.name, "status": c.status, "problems": c.problems} for c in self.ckpt.skipped]
        if loaded is None:
            if skipped:
                self._say("no valid checkpoint to resume from; starting from step 0", err=True)
            return None
        step = int(loaded["step"])
        self.trainer.step = step
        if step >= self.trainer.cfg.train.steps:
            return step  # nothing to resume: the trainer reports the run complete
        seconds = round(time.perf_counter() - start, 3)
        self._event("resume", step=step, checkpoint=str(self.ckpt.dir / f"step-{step:08d}"), seconds=seconds,
                    skipped=skipped, notes=loaded["notes"])
        self._say(f"resumed from {self.ckpt.dir}/step-{step:08d} (step {step} of {self.trainer.cfg.train.steps}) "
                  f"in {seconds:.1f} s" + "".join(f"; {n}" for n in loaded["notes"]))
        return step

    def _check_model_matches(self) -> None:
        """A checkpoint of another model shape would fail deep inside DCP; say it plainly. Every
        rank reads the same small file, so every rank raises the same error."""
        for c in scan(self.ckpt.dir):
            if c.status != "committed":
                continue
            try:
                saved = json.loads((c.path / "train_state.json").read_text())["meta"]["model"]
            except (OSError, ValueError, KeyError, TypeError):
                continue   # verification will report it
            current = self.state.meta["model"]
            diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
            if diff:
                detail = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"checkpoint {c.path} holds a different model ({detail}); use the same [model] "
                                 f"settings to resume, or another train.run_dir to start fresh")
            return

    # ------------------------------------------------------------------ after each step

    def check_step(self, trainer, res) -> None:
        if self.guard is None:
            return
        anomaly = self.guard.observe(res.step, res.loss, res.grad_norm)
        if anomaly is None:
            return
        fields = anomaly.as_dict()
        self._event("anomaly", step=fields.pop("step"), reason=fields.pop("kind"), **fields,
                    action=self.guard_cfg.action)
        if self.guard_cfg.action == "log":
            self._say(f"loss guard: {anomaly.describe()} (logged; fault.spike_action = \"log\")", err=True)
        elif self.guard_cfg.action == "stop":
            raise GuardError(f"loss guard: {anomaly.describe()}; stopping (fault.spike_action = \"stop\"). Resume "
                             f"from a checkpoint before step {anomaly.step}, or set fault.spike_action = \"rollback\"")
        else:
            self.rollback(anomaly)

    def rollback(self, anomaly: Anomaly) -> None:
        self.budget.charge(anomaly)
        start = time.perf_counter()
        latest_allowed = anomaly.step - max(1, self.guard_cfg.rollback_steps)
        loaded = self.ckpt.resume(self.state, max_step=latest_allowed)
        if loaded is None:
            raise GuardError(f"loss guard: {anomaly.describe()}, and no valid checkpoint at or before step "
                             f"{latest_allowed} to roll back to; save more often (checkpoint.every_steps) or lower "
                             f"fault.rollback_steps")
        to_step = int(loaded["step"])
        self._abandon_after(to_step)
        n = self.guard_cfg.skip_batches if self.guard_cfg.skip_batches >= 0 else anomaly.step - to_step
        samples = self.trainer.sampler.skip(n)
        self.trainer.step = to_step
        seconds = round(time.perf_counter() - start, 3)
        self._event("rollback", from_step=anomaly.step, to_step=to_step, reason=anomaly.kind, seconds=seconds,
                    rollbacks_in_window=len(self.budget.steps))
        self._event("skip", step=to_step, batches=n, samples=[samples.start, samples.stop])
        self._say(f"loss guard: {anomaly.describe()}; rolled back to step {to_step} and skipped {n} batches "
                  f"(samples {samples.start}..{samples.stop - 1}) in {seconds:.1f} s", err=True)

    def _abandon_after(self, step: int) -> None:
        """Checkpoints newer than the rollback target hold the trajectory that blew up: renamed
        so that a later resume never picks them (kept for inspection)."""
        if self.ckpt.rank != 0:
            return
        for c in scan(self.ckpt.dir):
            if c.step > step and STEP_RE.match(c.name):
                target = c.path.with_name(c.name + ".abandoned")
                shutil.rmtree(target, ignore_errors=True)
                os.rename(c.path, target)
                fsync_dir(self.ckpt.dir)

    def maybe_save(self, trainer, res) -> None:
        if res.step != trainer.step:
            return  # an earlier hook rolled the run back; this step no longer exists
        if self.ckpt.should_save(trainer.step, last=trainer.step >= trainer.cfg.train.steps):
            self.ckpt.save_async(trainer.step, self.state)

    # ------------------------------------------------------------------ reporting

    def summary_fields(self) -> dict:
        events = read_events(self.run_dir)
        resumes = [e for e in events if e.get("kind") == "resume"]
        recoveries = [{"kind": e["kind"], "step": e.get("from_step", e.get("step")),
                       "to_step": e.get("to_step", e.get("step")), "seconds": e.get("seconds")}
                      for e in events if e.get("kind") in ("resume", "rollback")]
        skipped = [{"step": e["step"], "batches": e["batches"], "samples": e["samples"]}
                   for e in events if e.get("kind") == "skip"]
        return {"restarts": len(resumes), "recoveries": recoveries, "skipped_batches": skipped}

    def _event(self, kind: str, **fields) -> None:
        if self.trainer.is_logger:
            append_event(self.run_dir, kind, **fields)

    def _say(self, msg: str, err: bool = False) -> None:
        if self.trainer.is_logger:
            print(msg, file=sys.stderr if err else sys.stdout, flush=True)


__all__ = ["Recovery", "guard_config"]
