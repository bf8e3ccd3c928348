"""The `suanli` command as users run it: doctor, train with local processes, data synth."""

import json
import os
import subprocess
import sys


ENV = {**os.environ, "SUANLI_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def suanli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "suanli.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_doctor_json_lists_all_seven_backends():
    r = suanli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["accelerator"] == "cpu" and rep["comm_backend"] == "gloo" and rep["device_count"] == 1
    assert {b["name"] for b in rep["backends"]} == {"cpu", "cuda", "rocm", "npu", "mlu", "musa", "xpu"}
    assert all(b["reason"] for b in rep["backends"])
    assert set(rep["peak_tflops"]) >= {"bf16", "fp32"}
    assert rep["peak_tflops"]["bf16"] is None  # an arbitrary CPU has no honest table figure


def test_train_two_processes_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    r = suanli("train", "examples/tiny.toml", "--nproc", "2", "--run-dir", str(run), "--set", "train.steps=6",
               "--set", "train.seq_len=64", "--set", "data.synthetic_tokens=50000")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert set(lines[0]) >= {"step", "loss", "grad_norm", "lr", "step_time_s", "tokens_per_s", "mfu"}
    assert lines[-1]["loss"] < lines[0]["loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2 and summary["final_loss"] == lines[-1]["loss"]
    assert "[parallel]" in (run / "config.toml").read_text()
    assert "step 6/6" in r.stdout and "tok/s" in r.stdout


def test_train_config_error_is_one_line():
    r = suanli("train", "examples/tiny.toml", "--nproc", "3", "--set", "parallel.tp=3", "--set", "train.steps=1")
    assert r.returncode == 2
    assert "parallel.tp: 3 does not divide model.n_heads=4; tp can be one of [1, 2]" in r.stderr
    assert "Traceback" not in r.stderr and "[rank" not in r.stdout  # refused before any process started
    r = suanli("train", "examples/tiny.toml", "--nproc", "2", "--set", "parallel.pp=2", "--set", "parallel.pp_layers=[1,2]")
    assert r.returncode == 2 and "parallel.pp_layers: [1, 2] sums to 3 but model.n_layers=4" in r.stderr


def test_data_synth(tmp_path):
    out = tmp_path / "c.bin"
    r = suanli("data", "synth", str(out), "--tokens", "100000", "--vocab-size", "256")
    assert r.returncode == 0, r.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["num_tokens"] == 100000 and out.stat().st_size == 100000 * 2


def test_python_api_example_trains_across_pp_and_tp():
    from conftest import run_workers

    outs = run_workers("../../examples/train_3d.py", 4)
    losses = [float(l.split("loss ")[1]) for o in outs for l in o.splitlines() if l.startswith("step ")]
    assert len(losses) == 20 and losses[-1] < losses[0] - 1.0
