"""The loss guard: NaN/Inf and loss-spike detection, and the rollback budget.

NaN or Inf in the loss or the gradient norm is an anomaly at once. A spike is a loss far
above its recent trend, judged robustly: the trend is an exponential moving average (EMA)
of the loss, and the scale is the median absolute deviation (MAD) of the recent residuals
`loss - EMA`. The robust z-score

    z = (residual - median(residuals)) / (1.4826 * MAD)

is compared with `z` (default 6): the MAD, unlike a standard deviation, is not inflated by
the very outliers it is meant to catch, and the residual against the EMA follows a falling
loss instead of flagging its normal descent. Only upward deviations count.

What to do about an anomaly (roll back, skip data) is `fault/recovery.py`'s job; this module
only decides, deterministically from values every rank shares (the global loss and the
global gradient norm), so all ranks reach the same verdict without a collective.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

ACTIONS = ("rollback", "stop", "log")
MAD_TO_SIGMA = 1.4826   # MAD of a normal distribution times this is its standard deviation
MIN_REL_SCALE = 1e-3    # scale floor (relative to the EMA): a perfectly flat history is not infinitely sensitive


class GuardError(RuntimeError):
    """The run cannot continue safely without a person."""


@dataclass
class GuardConfig:
    z: float = 6.0              # robust z-score above which a loss is a spike
    ema: float = 0.1            # weight of the newest loss in the trend
    history: int = 50           # residuals kept for the median / MAD
    min_history: int = 20       # residuals needed before spikes are judged (NaN/Inf always are)
    action: str = "rollback"    # rollback | stop | log
    rollback_steps: int = 0     # restore a checkpoint at least this many steps before the anomaly
    skip_batches: int = -1      # batches skipped after a rollback; -1: those from the checkpoint to the anomaly
    max_rollbacks: int = 3      # rollbacks allowed within `window` steps before stopping
    window: int = 1000

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.z > 0, f"fault.spike_z: must be > 0, got {self.z}")
        need(0 < self.ema <= 1, f"fault.spike_ema: must be in (0, 1], got {self.ema}")
        need(self.history >= 3, f"fault.spike_history: must be >= 3, got {self.history}")
        need(3 <= self.min_history <= self.history,
             f"fault.spike_min_history: must be in [3, fault.spike_history={self.history}], got {self.min_history}")
        need(self.action in ACTIONS, f"fault.spike_action: '{self.action}' is not one of {', '.join(ACTIONS)}")
        need(self.rollback_steps >= 0, f"fault.rollback_steps: must be >= 0, got {self.rollback_steps}")
        need(self.skip_batches >= -1, f"fault.skip_batches: must be >= 0, or -1 for automatic, got {self.skip_batches}")
        need(self.max_rollbacks >= 1, f"fault.max_rollbacks: must be >= 1, got {self.max_rollbacks}")
        need(self.window >= 1, f"fault.rollback_window: must be >= 1, got {self.window}")


@dataclass
class Anomaly:
    step: int
    kind: str                    # nan_loss | nan_grad_norm | spike
    loss: float
    grad_norm: float
    z: float | None = None
    threshold: float | None = None   # the loss above which this step would have been a spike

    def describe(self) -> str:
        if self.kind == "spike":
            return (f"loss spike at step {self.step}: loss {self.loss:.4f} > {self.threshold:.4f} "
                    f"(robust z = {self.z:.1f})")
        what = "loss" if self.kind == "nan_loss" else "gradient norm"
        value = self.loss if self.kind == "nan_loss" else self.grad_norm
        return f"non-finite {what} ({value}) at step {self.step}"

    def as_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in self.__dict__.items()}


class SpikeGuard:
    """Feed it each step's (loss, grad_norm); it returns an `Anomaly` or None. Its state is
    JSON (saved in checkpoints, so a resumed run judges exactly as an uninterrupted one)."""

    def __init__(self, cfg: GuardConfig | None = None) -> None:
        self.cfg = cfg or GuardConfig()
        self.cfg.validate()
        self.ema: float | None = None
        self.residuals: deque[float] = deque(maxlen=self.cfg.history)

    def observe(self, step: int, loss: float, grad_norm: float) -> Anomaly | None:
        if not math.isfinite(loss):
            return Anomaly(step, "nan_loss", loss, grad_norm)
        if not math.isfinite(grad_norm):
            return Anomaly(step, "nan_grad_norm", loss, grad_norm)
        if self.ema is None:
            self.ema = loss
            return None
        residual = loss - self.ema
        if len(self.residuals) >= self.cfg.min_history:
            center = statistics.median(self.residuals)
            mad = statistics.median(abs(r - center) for r in self.residuals)
            scale = max(MAD_TO_SIGMA * mad, MIN_REL_SCALE * abs(self.ema), 1e-12)
            z = (residual - center) / scale
            if z > self.cfg.z:
                # Not folded into the history: the trend must not learn the spike.
                return Anomaly(step, "spike", loss, grad_norm, z, self.ema + center + self.cfg.z * scale)
        self.residuals.append(residual)
        self.ema += self.cfg.ema * residual
        return None

    def state_dict(self) -> dict:
        return {"ema": self.ema, "residuals": list(self.residuals)}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"]
        self.residuals = deque(state["residuals"], maxlen=self.cfg.history)


class RollbackBudget:
    """At most `max_rollbacks` rollbacks for anomalies within any `window` steps."""

    def __init__(self, max_rollbacks: int, window: int) -> None:
        self.max_rollbacks, self.window = max_rollbacks, window
        self.steps: list[int] = []   # anomaly steps that caused a rollback (this process)

    def charge(self, anomaly: Anomaly) -> None:
        recent = [s for s in self.steps if s > anomaly.step - self.window]
        if len(recent) >= self.max_rollbacks:
            raise GuardError(
                f"loss guard: {anomaly.describe()}, after {len(recent)} rollbacks within {self.window} steps "
                f"(anomalies at steps {recent}); the run needs a person — lower train.lr, inspect the data "
                f"around these steps, or raise fault.max_rollbacks")
        self.steps.append(anomaly.step)


__all__ = ["GuardConfig", "SpikeGuard", "Anomaly", "RollbackBudget", "GuardError", "ACTIONS"]
