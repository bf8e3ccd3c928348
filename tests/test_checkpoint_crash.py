"""Crash consistency: a process SIGKILLed while saving — at random moments and at each step of
the commit (before the manifest, before and after the rename, after LATEST, during
retention) — always leaves a directory from which resume picks a valid checkpoint, never a
torn one, and never one older than a checkpoint already committed.
"""

from conftest import json_lines, run_workers

TRIALS = 34


def test_sigkill_at_any_moment_leaves_a_valid_checkpoint(tmp_path):
    out = run_workers("ckpt_crash_worker.py", 1, tmp_path / "checkpoints", TRIALS, timeout_s=180)
    (res,) = json_lines(out[0], "RESULT")
    assert res["errors"] == []
    assert res["trials"] == TRIALS >= 30
    # Every named commit point was hit (twice each), and random kills landed mid-write.
    assert res["crash_points"] == {p: 2 for p in ("before_manifest", "before_rename", "after_rename",
                                                  "after_latest", "mid_retention")}
    assert res["killed_mid_write"] >= 3
    # Resume made progress across the crashes (each pick was loaded and its tensors checked);
    # loose bounds, as a busy host slows the children against the kill timer.
    assert len(res["resumed_steps"]) >= TRIALS // 2 and res["resumed_steps"][-1] >= 5
