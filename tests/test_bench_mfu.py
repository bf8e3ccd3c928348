"""`suanli bench mfu`: peak sources, token accounting, time breakdown, sweep grid, and the
real command on CPU with one and two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from suanli.backends.cpu import CPUAccelerator
from suanli.bench.breakdown import bubble_formula, clip, length, merge, subtract
from suanli.bench.flops import model_flops_per_token
from suanli.bench.mfu_run import MfuSpec, format_mfu, resolve_peak, summarize
from suanli.bench.sweep import expand, parse_grid
from suanli.infra.model import preset

JSON_KEYS = {"tokens_per_s_per_device", "tflops_per_device", "mfu", "hfu", "peak_tflops", "peak_source",
             "peak_memory_bytes"}


class TableDevice(CPUAccelerator):
    """A device the HAL's table knows (100 TFLOP/s bf16)."""

    def device_name(self, index: int = 0) -> str:
        return "Test Accelerator 9000"

    def peak_flops(self, dtype="bf16", index: int = 0):
        return 100e12


def _summary(spec: MfuSpec, world: int, peak, source, step_s: float = 0.5) -> dict:
    fpt = model_flops_per_token(preset(spec.model), spec.seq_len)
    return summarize(spec, [step_s] * 3, world, fpt, fpt, peak, source, trainer_step_time_s=step_s,
                     peak_memory_bytes=1 << 20, device="Mystery CPU", accelerator="cpu", breakdown=None,
                     bubble={"measured": None, "formula": 0.0})


def test_unknown_peak_means_mfu_unknown_never_a_default():
    peak, source = resolve_peak(CPUAccelerator(), "fp32", "table", 0.0)
    assert (peak, source) == (None, "unknown")
    r = _summary(MfuSpec(), 1, peak, source)
    assert r["mfu"] is None and r["hfu"] is None and r["peak_tflops"] is None
    assert r["tflops_per_device"] > 0  # the achieved rate is still reported
    assert "MFU unknown" in format_mfu(r)


def test_user_peak_overrides_table_and_measurement():
    acc = TableDevice()
    assert resolve_peak(acc, "bf16", "table", 0.0) == (100e12, "table:Test Accelerator 9000")
    assert resolve_peak(acc, "bf16", "table", 50.0) == (50e12, "user")
    assert resolve_peak(acc, "bf16", "measured", 50.0, measured_flops=1e9) == (50e12, "user")
    assert resolve_peak(acc, "bf16", "measured", 0.0, measured_flops=1e9) == (1e9, "measured")
    with pytest.raises(ValueError, match="GEMM probe"):
        resolve_peak(acc, "bf16", "measured", 0.0, measured_flops=None)
    r = _summary(MfuSpec(dtype="bf16"), 1, 50e12, "user")
    assert r["peak_source"] == "user" and r["peak_tflops"] == 50.0


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 2), (2, 1, 2), (1, 2, 2)])
def test_tokens_per_device_divide_global_by_every_device(tp, pp, dp):
    spec = MfuSpec(seq_len=128, micro_batch=4, tp=tp, pp=pp, dp=dp)
    world = tp * pp * dp
    r = _summary(spec, world, 1e12, "user", step_s=0.5)
    # Each data-parallel replica consumes its own micro-batches; tp and pp ranks share them.
    assert r["global_batch"] == 4 * spec.m * dp
    assert r["tokens_per_s"] == pytest.approx(r["global_batch"] * 128 / 0.5)
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / world)
    fpt = r["flops_per_token"]
    assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s_per_device"] * fpt / 1e12)
    assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * fpt / 1e12)


def test_interval_arithmetic():
    assert merge([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]
    assert subtract([(0, 10)], [(1, 2), (5, 7), (9, 12)]) == [(0, 1), (2, 5), (7, 9)]
    assert subtract([(0, 2), (4, 6)], [(1, 5)]) == [(0, 1), (5, 6)]
    assert length(clip([(-5, 3), (8, 20)], (0, 10))) == 5


def test_bubble_formula():
    assert bubble_formula("1f1b", 2, 4) == pytest.approx(1 / 5)
    assert bubble_formula("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_formula("interleaved-1f1b", 2, 4, 2) == pytest.approx(1 / 9)
    assert bubble_formula("zbv", 2, 4) is None
    assert bubble_formula("1f1b", 1, 4) == 0.0


def test_sweep_grid_skips_what_cannot_run():
    base = MfuSpec(model="tiny")
    specs = expand(base, parse_grid("tp=1,2,3 pp=1,2 dp=1,2 dp_mode=fsdp,ddp"), max_procs=2)
    labels = [s.label() for s in specs]
    assert len(labels) == len(set(labels))
    assert all(s.nproc <= 2 for s in specs)
    assert not any(s.tp == 3 for s in specs)  # tiny has 4 heads
    assert {s.dp_mode for s in specs if s.dp == 2} == {"fsdp", "ddp"}
    with pytest.raises(ValueError, match="unknown key"):
        parse_grid("tensor=2")


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUANLI_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "suanli.cli", "bench", "mfu", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("dp", [1, 2])
def test_cli_mfu_against_measured_peak(dp):
    proc = run_cli("--model", "tiny", "--steps", "3", "--json", "--peak", "measured", "--dp", str(dp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert JSON_KEYS <= set(r)
    assert r["peak_source"] == "measured" and r["world_size"] == dp
    assert 0 < r["mfu"] <= 1, r
    assert r["hfu"] == pytest.approx(r["mfu"])  # no recomputation
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / dp)
    assert r["peak_memory_bytes"] > 0
    b = r["breakdown"]
    assert b["ranks"] == dp and 0 < b["compute"] <= 1
    if dp == 2:
        assert b["exposed_comm"] > 0  # FSDP's gathers and reductions show up


def test_overhead_interleaves_both_orders():
    from types import SimpleNamespace

    from suanli.bench.overhead import Interleaver
    from suanli.infra.trainer import Hooks

    order: list[str] = []
    trainer = SimpleNamespace(acc=CPUAccelerator(), hooks=Hooks(), step=0)
    plain = SimpleNamespace(step=lambda stamp: order.append("P"))
    inter = Interleaver(trainer, plain)
    for _ in range(4):  # what Trainer.fit() calls, per step
        for h in trainer.hooks.on_phase:
            h(trainer, "data")
        order.append("S")
        for h in trainer.hooks.on_step_end:
            h(trainer, SimpleNamespace(step_time_s=0.0))
    assert "".join(order) == "SPPSSPPS"  # neither side always follows the other
    assert len(inter.suanli) == len(inter.plain_times) == 4
