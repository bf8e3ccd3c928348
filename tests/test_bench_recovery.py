"""`suanli bench recovery` on real launchers: the torchrun leg (real torchrun agent, real gloo
ranks, a real SIGKILL) recovers from its checkpoint and is measured sanely; the Ray Train leg
does the same when ray[train] is installed; bad settings and a missing Ray Train fail with
one clear message."""

import sys

import pytest

from suanli.bench.recovery import Leg, RecoverySpec, require_ray_train

SMALL = dict(steps=8, checkpoint_every=2, fault_step=5, seq_len=32, global_batch=4, micro_batch=2,
             leg_timeout_s=150.0)


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("SUANLI_ACCELERATOR", "cpu")


def _check_recovered(r, spec):
    assert r["fault_fired"] and r["finished"], r
    assert r["steps_done"] == spec.steps
    assert 0 <= r["detection_s"] < r["first_step_after_resume_s"], r
    assert r["last_step_before_fault"] == spec.fault_step
    # the step-4 save is asynchronous: a kill right after step 5 may beat its commit
    assert r["resumed_from_step"] in (2, 4), r
    assert r["steps_recomputed"] == spec.fault_step - r["resumed_from_step"]


def test_torchrun_leg_restarts_and_resumes_from_its_checkpoint(tmp_path):
    spec = RecoverySpec(**SMALL, launchers=["torchrun"], faults=["kill"])
    spec.validate()
    r = Leg("torchrun", "kill", spec, tmp_path).run()
    _check_recovered(r, spec)
    assert r["returncode"] == 0 and 0 < r["new_ranks_started_s"] < r["first_step_after_resume_s"]
    assert r["detection_s"] < 10  # the agent polls its children every 0.1 s


def _ray_train_missing() -> bool:
    # ray ships the ray.train package even without its dependencies; only importing it tells.
    try:
        require_ray_train()
        return False
    except SystemExit:
        return True


@pytest.mark.skipif(_ray_train_missing(), reason="Ray Train is not installed (pip install 'suanli[bench]')")
@pytest.mark.timeout(300)
def test_ray_train_leg_restarts_and_resumes_from_its_checkpoint(tmp_path):
    spec = RecoverySpec(**{**SMALL, "leg_timeout_s": 240.0}, launchers=["raytrain"], faults=["kill"])
    r = Leg("raytrain", "kill", spec, tmp_path).run()
    _check_recovered(r, spec)


@pytest.mark.parametrize("field, value, words", [
    ("fault_step", 4, "--fault-step 4 is a checkpoint step"),
    ("fault_step", 9, "--fault-step: must be between 1 and --steps - 1"),
    ("workers", 1, "--workers: the faults need a peer rank"),
    ("launchers", ["slurm"], "--launchers: unknown ['slurm']"),
])
def test_bad_settings_name_the_flag(field, value, words):
    spec = RecoverySpec(**{**SMALL, field: value})
    with pytest.raises(ValueError, match=r"^" + __import__("re").escape(words)):
        spec.validate()


def test_missing_ray_train_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.train.torch", None)  # what an absent package looks like to import
    with pytest.raises(SystemExit, match=r"pip install 'suanli\[bench\]'"):
        require_ray_train()
