"""The loss guard's decisions: NaN/Inf at once, spikes by EMA + MAD z-score, no false alarms
on a normally falling (noisy) loss, exact state round-trip, and the rollback budget."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from suanli.fault.guard import GuardConfig, GuardError, RollbackBudget, SpikeGuard
from suanli.infra.config import ConfigError, load_config


def falling_loss(n: int, seed: int = 0, noise: float = 0.02) -> list[float]:
    rng = random.Random(seed)
    return [2.0 + 4.0 * math.exp(-i / 30) + rng.gauss(0, noise) for i in range(n)]


def feed(guard: SpikeGuard, losses, start: int = 1):
    for i, loss in enumerate(losses, start=start):
        a = guard.observe(i, loss, 1.0)
        if a is not None:
            return a
    return None


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("loss,grad_norm,kind", [(NAN, 1.0, "nan_loss"), (INF, 1.0, "nan_loss"),
                                                 (3.0, NAN, "nan_grad_norm"), (3.0, INF, "nan_grad_norm")])
def test_non_finite_is_caught_at_once(loss, grad_norm, kind):
    a = SpikeGuard().observe(1, loss, grad_norm)   # even on the very first step
    assert a is not None and a.kind == kind and a.step == 1


def test_spike_detected_at_its_step_only():
    losses = falling_loss(120)
    losses[90] += 1.0
    a = feed(SpikeGuard(), losses)
    assert a is not None and a.kind == "spike" and a.step == 91
    assert a.z > 6 and losses[90] > a.threshold


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.001, 0.05))
def test_no_false_alarm_on_noisy_falling_loss(seed, noise):
    assert feed(SpikeGuard(), falling_loss(300, seed, noise)) is None


def test_spikes_need_history_and_are_one_sided():
    g = SpikeGuard(GuardConfig(min_history=20))
    assert feed(g, [5.0] * 5 + [50.0]) is None      # too little history to judge a spike
    g = SpikeGuard()
    losses = falling_loss(60)
    losses[50] -= 1.5                                 # a sudden improvement is not an anomaly
    assert feed(g, losses) is None


def test_state_round_trip_gives_identical_decisions():
    losses = falling_loss(100)
    losses[80] += 1.5
    a = SpikeGuard()
    feed(a, losses[:50])
    b = SpikeGuard()
    b.load_state_dict(a.state_dict())
    assert feed(a, losses[50:], start=51).as_dict() == feed(b, losses[50:], start=51).as_dict()


def test_rollback_budget_stops_after_max_in_window():
    budget = RollbackBudget(max_rollbacks=2, window=100)
    g = SpikeGuard()
    budget.charge(g.observe(10, float("nan"), 1.0))
    budget.charge(g.observe(50, float("nan"), 1.0))
    with pytest.raises(GuardError, match="2 rollbacks within 100 steps"):
        budget.charge(g.observe(90, float("nan"), 1.0))
    budget.charge(g.observe(400, float("nan"), 1.0))   # the window has moved on


@pytest.mark.parametrize("override,field", [("fault.spike_action=\"panic\"", "fault.spike_action"),
                                            ("fault.spike_ema=0", "fault.spike_ema"),
                                            ("fault.skip_batches=-2", "fault.skip_batches"),
                                            ("checkpoint.keep_last=-1", "checkpoint.keep_last")])
def test_bad_settings_name_the_key(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, [override])
