"""`suanli bench peak` and `suanli bench comm`: the GEMM probe, bandwidth definitions, reports."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest

from suanli.backends.cpu import CPUAccelerator
from suanli.bench.comm import BUS_FACTOR, CommSpec, bandwidth, parse_size, run_comm
from suanli.bench.peak import measure_peak, shapes_for, table_peak
from suanli.bench.report import results_dir, sweep_markdown, write_sweep


def test_gemm_probe_measures_a_positive_rate_and_says_how():
    m = measure_peak("fp32", CPUAccelerator(), sizes=(64, 128), min_time_s=0.005, trials=2)
    assert m.tflops > 0 and m.tflops == max(s.best_tflops for s in m.shapes)
    assert m.best_shape in [(64, 64, 64), (128, 128, 128)]
    assert "best of 2 trials" in m.method
    with pytest.raises(ValueError, match="--dtype"):
        measure_peak("fp64", CPUAccelerator(), sizes=(64,))


def test_probe_sweeps_short_inner_dimensions_too():
    assert shapes_for((512, 2048)) == [(512, 512, 512), (2048, 2048, 2048), (2048, 256, 2048)]


def test_cpu_has_no_table_peak():
    assert table_peak(CPUAccelerator(), "fp32") == (None, None)


def test_bus_bandwidth_follows_nccl_tests():
    algbw, busbw = bandwidth("all_reduce", 1 << 20, 1e-3, 4)
    assert algbw == pytest.approx((1 << 20) / 1e-3)
    assert busbw == pytest.approx(algbw * 2 * 3 / 4)
    assert bandwidth("all_gather", 100, 1.0, 8)[1] == pytest.approx(100 * 7 / 8)
    assert BUS_FACTOR["broadcast"](8) == 1.0
    assert bandwidth("all_reduce", 100, 1.0, 1)[1] == 0.0


def test_parse_size():
    assert parse_size("4096") == 4096 and parse_size("64K") == 65536 and parse_size("16MiB") == 16 << 20
    with pytest.raises(ValueError, match="--sizes"):
        parse_size("lots")


def _row(layout: str, world: int, tps: float, mfu) -> dict:
    return {"layout": layout, "model": "tiny", "world_size": world, "pp": 1, "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / world, "tflops_per_device": 0.01, "mfu": mfu, "hfu": mfu,
            "peak_tflops": 0.1, "peak_source": "measured", "peak_memory_bytes": 1 << 28,
            "breakdown": {"compute": 0.9, "exposed_comm": 0.05}, "bubble": {"measured": None, "formula": 0.0}}


def test_sweep_report_files(tmp_path):
    results = [_row("tp1 pp1 dp1", 1, 1000, 0.1), _row("tp1 pp1 dp2", 2, 1800, 0.09),
               {"layout": "tp2 pp1 dp1", "world_size": 2, "error": "boom"}]
    files = write_sweep(results, tmp_path, "suanli bench mfu --sweep")
    for key in ("json", "markdown", "mfu_png", "scaling_png"):
        assert files[key].is_file() and files[key].stat().st_size > 0
    md = sweep_markdown(results)
    assert "failed: boom" in md and "10.00%" in md
    d = results_dir(tmp_path, "Intel(R) Xeon(R) Processor", datetime.date(2026, 1, 2))
    assert d.name == "2026-01-02-intel-r-xeon-r-processor" and d.is_dir()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUANLI_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "suanli.cli", "bench", *args], capture_output=True, text=True,
                          env=env, timeout=240)


def test_cli_peak_json_puts_table_figure_beside_measurement():
    proc = _cli("peak", "--quick", "--dtype", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    assert row["dtype"] == "fp32" and row["measured_tflops"] > 0
    assert row["table_tflops"] is None  # no CPU is in the HAL's table


def test_comm_two_processes():
    # Through the launcher as the command runs it, without paying for a third interpreter.
    r = run_comm(CommSpec(sizes=[4096, 65536], min_time_s=0.01, warmup=2), nproc=2)
    assert r["world_size"] == 2 and r["backend"] == "gloo" and [x["size_bytes"] for x in r["rows"]] == [4096, 65536]
    for x in r["rows"]:
        assert x["time_us"] > 0
        assert x["busbw_GBps"] == pytest.approx(x["algbw_GBps"])  # 2(n-1)/n = 1 for n = 2
