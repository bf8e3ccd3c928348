"""Resume through `Trainer.fit` on real gloo ranks: exact (bitwise) resume in the same layout
past broken checkpoints, resharding to other layouts and world sizes, a completed run, and
NaN rollback.

The reference run trains 6 steps at tp=2 (2 processes), saving every 2 steps. fp32 on CPU:
a run stopped and resumed in the same layout must reproduce its losses bit for bit; a run
resumed from its step-4 checkpoint in another layout must continue within the 1e-4
relative tolerance that layouts agree to anyway (test_parallel_parity.py).
"""

import json
import math
import shutil

import pytest

from conftest import json_lines, run_workers
from suanli.fault.events import read_events

WORKER = "ckpt_train_worker.py"
TP2 = ["train.steps=6", "parallel.tp=2"]


def train(nproc, run_dir, *overrides, env=None):
    out = run_workers(WORKER, nproc, run_dir, *overrides, env=env)
    results = json_lines(out[0], "RESULT")
    return (results[0] if results else None), out[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    res, _ = train(2, run, *TP2)
    assert res["steps"] == [1, 2, 3, 4, 5, 6]
    return run, res["losses"]


def test_resume_is_bitwise_exact_and_skips_broken_checkpoints(reference, tmp_path):
    """The job died after step 6, and its newest checkpoints are broken: step 6 has a
    flipped byte, step 4 never committed. Resume must say why it skips them, pick step 2,
    and reproduce the uninterrupted losses bit for bit from there."""
    ref_run, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    shard = run / "checkpoints" / "step-00000006" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    (run / "checkpoints" / "step-00000004" / "manifest.json").unlink()

    res, out = train(2, run, *TP2)
    assert "skipping checkpoint step-00000006 (corrupt): __1_0.distcp: SHA-256 mismatch" in out
    assert "skipping checkpoint step-00000004 (torn)" in out
    assert "resumed from" in out and "step-00000002" in out
    assert res["steps"] == [3, 4, 5, 6]
    assert res["losses"] == ref[2:], "resumed losses differ from the uninterrupted run"

    (resume,) = read_events(run)
    assert resume["kind"] == "resume" and resume["step"] == 2
    assert [s["name"] for s in resume["skipped"]] == ["step-00000006", "step-00000004"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 3, 4, 5, 6]   # appended: re-run steps appear again
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["recoveries"][0]["kind"] == "resume"

    # Steps 4 and 6 were saved again, replacing the broken directories; started once more
    # (here at world size 1), the run says it is complete and trains nothing.
    res, out = train(1, run, "train.steps=6")
    assert "is complete" in out and res["steps"] == [] and res["final_step"] == 6


LAYOUTS = {
    "tp1-dp2": (2, []),
    "world-size-1": (1, []),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reshard_from_tp2(reference, tmp_path, layout):
    ref_run, ref = reference
    nproc, overrides = LAYOUTS[layout]
    run = tmp_path / "run"
    shutil.copytree(ref_run / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000004")
    res, out = train(nproc, run, "train.steps=6", *overrides)
    assert "resumed from" in out and res["steps"] == [5, 6]
    for step, (a, b) in enumerate(zip(res["losses"], ref[4:]), start=5):
        assert abs(a - b) <= 1e-4 * abs(b), f"{layout}: step {step} loss {a} vs {b} before the reshard"


def test_nan_rolls_back_skips_and_finishes(tmp_path):
    """Two pipeline stages per rank (interleaved 1F1B), so save and rollback also cover a
    rank holding several model parts."""
    run = tmp_path / "run"
    res, out = train(2, run, "train.steps=8", "fault.rollback_steps=2", "parallel.pp=2",
                     'parallel.pp_schedule="interleaved-1f1b"', env={"NAN_AT": "7"})
    # NaN at step 7 -> newest checkpoint at or before step 5 is step 4; step 6 is abandoned.
    assert res["steps"] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8] and res["final_step"] == 8
    assert all(math.isfinite(x) for x in res["losses"][7:])
    events = read_events(run)
    assert [e["kind"] for e in events] == ["anomaly", "rollback", "skip"]
    anomaly, rollback, skip = events
    assert anomaly["step"] == 7 and anomaly["reason"] == "nan_grad_norm"
    assert (rollback["from_step"], rollback["to_step"]) == (7, 4)
    assert skip["batches"] == 3 and skip["samples"] == [16, 28]   # global_batch 4: steps 5..7's samples
    assert "rolled back to step 4" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_batches"] == [{"step": 4, "batches": 3, "samples": [16, 28]}]
    assert summary["recoveries"][0]["kind"] == "rollback"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step-00000006.abandoned" in names and "step-00000008" in names
