"""The [comm] options through the real Trainer: bytes are reported per step, compression
cuts them without hurting the loss, and a run resumed from a checkpoint continues exactly
as the uninterrupted one (the comm state is checkpointed per rank)."""

import json
import shutil

import pytest

from conftest import json_lines, run_workers


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_int8_gradient_sync_sends_fewer_bytes_at_the_same_loss(tmp_path):
    base = ["parallel.dp_replicate=2"]
    run_workers("train_worker.py", 2, tmp_path / "fp32", *base)
    run_workers("train_worker.py", 2, tmp_path / "int8", *base, 'comm.grad="int8"')
    fp32, int8 = metrics(tmp_path / "fp32"), metrics(tmp_path / "int8")
    assert all(m["comm_bytes"] > 0 for m in fp32 + int8)
    assert int8[-1]["comm_bytes"] < 0.35 * fp32[-1]["comm_bytes"]  # 1 byte + block scales vs 4 bytes
    assert abs(int8[-1]["loss"] - fp32[-1]["loss"]) < 0.02 * fp32[-1]["loss"]


# 8 steps, checkpoints every 2 (ckpt_train_worker.py). H = 3 puts the step-4 checkpoint in
# the middle of an inner phase, where the replicas' weights and AdamW moments differ and the
# outer copy, momentum and int8 residuals exist only in the comm state.
DILOCO = ["parallel.dp_replicate=2", "comm.diloco_inner_steps=3", "comm.diloco_warmup_steps=1",
          'comm.diloco_compress="int8"', "comm.diloco_outer_momentum=0.5"]
RESUME_CASES = {
    "diloco-int8": DILOCO,
    # two fragments, one synced in the background and applied a step later: the save at
    # step 4 has fragment 1's averaged pseudo-gradient (launched at step 3) still to apply
    "diloco-int8-overlap": DILOCO + ["comm.diloco_streaming_fragments=2", "comm.diloco_overlap_steps=1"],
    "int8-grad": ["parallel.dp_replicate=2", 'comm.grad="int8"'],
    # torch's powerSGD_hook: compressing from step 3, so the step-4 checkpoint holds residuals
    # and warm-start P/Q, and the resumed DDP meets them on its construction-time buckets
    "powersgd-ddp-hook": ["parallel.dp_replicate=2", 'comm.grad="powersgd"', "comm.powersgd_rank=2",
                          "comm.powersgd_warmup_steps=2"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_exactly_with_comm_state(tmp_path, case):
    sets = RESUME_CASES[case]
    ref_dir = tmp_path / "ref"
    ref = json_lines(run_workers("ckpt_train_worker.py", 2, ref_dir, *sets)[0], "RESULT")[0]
    assert ref["steps"] == list(range(1, 9))
    per_rank = ref_dir / "checkpoints" / "step-00000004" / "per_rank"
    assert sorted(p.name for p in per_rank.iterdir()) == ["comm-rank00000.pt", "comm-rank00001.pt"]

    run = tmp_path / "resumed"   # the job died after step 4's checkpoint committed
    shutil.copytree(ref_dir, run)
    for step in (6, 8):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    out = run_workers("ckpt_train_worker.py", 2, run, *sets)[0]
    res = json_lines(out, "RESULT")[0]
    assert "step-00000004" in out and "per-rank state not restored" not in out
    assert res["steps"] == [5, 6, 7, 8]
    for step, a, b in zip(res["steps"], res["losses"], ref["losses"][4:]):
        assert abs(a - b) <= 1e-6 * abs(b), f"{case} step {step}: resumed {a} vs uninterrupted {b}"
    # the bytes sent per step follow the same schedule after the resume
    assert [m["comm_bytes"] for m in metrics(run)][-4:] == [m["comm_bytes"] for m in metrics(ref_dir)][4:]
