"""The [comm] options through the real Trainer: bytes are reported per step and compression
cuts them without hurting the loss."""

import json

from conftest import run_workers


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
