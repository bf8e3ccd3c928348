"""Measured dense GEMM peak of the current device (`suanli bench peak`).

Method: matmuls C = A·B (2·m·k·n FLOPs each) over a sweep of shapes: squares n×n×n for n
swept upward, and for each n ≥ 1024 also n×(n/8)×n — a short inner dimension, as in
transformer projections, which many GEMM libraries run faster because the panels stay in
cache. For each shape the iteration count is calibrated so one trial lasts at least
`min_time_s` (sustained: many back-to-back matmuls, not one lucky call); several trials are
timed between device synchronisations and the shape's rate is its best trial (a machine
shared with other work only ever *lowers* a trial, so the best one is the closest to the
device's own rate). The peak is the best shape. Shapes stop growing once a single matmul
would take longer than `max_single_s`, so a slow dtype (fp16 on many CPUs) cannot stall
the probe.

This is what the device sustains on dense GEMM here — usually below the vendor's datasheet
figure (clocks, power, thermal limits), and the honest denominator for MFU on a device the
HAL's table does not know (every CPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from suanli.backends import Accelerator, get_accelerator
from suanli.backends.peak_flops import match_row

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Square sizes per device type: a CPU saturates by n≈1–2k; accelerators need bigger tiles.
SIZES: dict[str, tuple[int, ...]] = {"cpu": (256, 512, 1024, 2048)}
DEFAULT_SIZES = (1024, 2048, 4096, 8192, 16384)
QUICK_SIZES: dict[str, tuple[int, ...]] = {"cpu": (512, 1024, 2048)}
DEFAULT_QUICK_SIZES = (2048, 4096, 8192)

Shape = tuple[int, int, int]  # (m, k, n)


@dataclass
class ShapeRate:
    shape: Shape
    iters: int                 # matmuls per trial
    trial_tflops: list[float]  # one rate per trial

    @property
    def best_tflops(self) -> float:
        return max(self.trial_tflops)

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "iters": self.iters, "best_tflops": self.best_tflops,
                "median_tflops": statistics.median(self.trial_tflops), "trial_tflops": self.trial_tflops}


@dataclass
class PeakMeasurement:
    dtype: str
    device: str
    tflops: float              # best shape's best trial
    best_shape: Shape
    shapes: list[ShapeRate] = field(default_factory=list)
    skipped: list[Shape] = field(default_factory=list)  # left out: one matmul would be too slow
    method: str = ""

    @property
    def flops(self) -> float:
        return self.tflops * 1e12

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = [s.as_dict() for s in self.shapes]
        return d


def sizes_for(acc: Accelerator, quick: bool = False) -> tuple[int, ...]:
    table, default = (QUICK_SIZES, DEFAULT_QUICK_SIZES) if quick else (SIZES, DEFAULT_SIZES)
    return table.get(acc.device_type, default)


def shapes_for(sizes: tuple[int, ...]) -> list[Shape]:
    shapes: list[Shape] = []
    for n in sorted(sizes):
        shapes.append((n, n, n))
        if n >= 1024:
            shapes.append((n, n // 8, n))
    return shapes


def _timed(acc: Accelerator, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, iters: int) -> float:
    acc.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    acc.synchronize()
    return time.perf_counter() - start


def time_gemm(acc: Accelerator, shape: Shape, dtype: torch.dtype, device: torch.device, min_time_s: float,
              trials: int) -> ShapeRate:
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    _timed(acc, a, b, c, 2)  # warm-up: library handles, kernel choice, page faults
    iters, elapsed = 1, _timed(acc, a, b, c, 1)
    while elapsed < min_time_s:  # calibrate so a trial is long enough for the timer
        iters = max(iters + 1, int(iters * min_time_s / max(elapsed, 1e-6) * 1.1))
        elapsed = _timed(acc, a, b, c, iters)
    rates = [2 * m * k * n * iters / _timed(acc, a, b, c, iters) / 1e12 for _ in range(trials)]
    return ShapeRate(shape, iters, rates)


def measure_peak(dtype: str = "fp32", acc: Accelerator | None = None, sizes: tuple[int, ...] | None = None,
                 min_time_s: float = 0.2, trials: int = 5, max_single_s: float = 1.0,
                 device: torch.device | None = None) -> PeakMeasurement:
    acc = acc or get_accelerator()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    device = device or acc.device()
    shapes = shapes_for(tuple(sizes or sizes_for(acc)))
    measured: list[ShapeRate] = []
    skipped: list[Shape] = []
    for shape in shapes:
        if measured:
            # Projected time of one matmul of this shape at the best rate seen so far.
            best = max(s.best_tflops for s in measured)
            if 2 * shape[0] * shape[1] * shape[2] / (best * 1e12) > max_single_s:
                skipped.append(shape)
                continue
        measured.append(time_gemm(acc, shape, DTYPES[dtype], device, min_time_s, trials))
    best = max(measured, key=lambda s: s.best_tflops)
    method = (f"GEMM shapes (m,k,n) {[list(s) for s in shapes]}; per shape: iterations calibrated to >= "
              f"{min_time_s}s per trial, best of {trials} trials; peak = best shape")
    return PeakMeasurement(dtype, acc.device_name(), best.best_tflops, best.shape, measured, skipped, method)


def table_peak(acc: Accelerator, dtype: str) -> tuple[float | None, str | None]:
    """The HAL table's dense TFLOP/s for this device and dtype, with the row's source (or None)."""
    flops = acc.peak_flops(dtype)
    if flops is None:
        return None, None
    row = match_row(acc.device_name())
    return flops / 1e12, (row.source if row else None)


def peak_report(dtypes: list[str], acc: Accelerator | None = None, quick: bool = False) -> list[dict]:
    """One row per dtype: measured peak next to the HAL table's figure (None when the table
    has no row for this device)."""
    acc = acc or get_accelerator()
    rows = []
    for dt in dtypes:
        m = measure_peak(dt, acc, sizes=sizes_for(acc, quick), min_time_s=0.05 if quick else 0.2,
                         trials=3 if quick else 5)
        table, source = table_peak(acc, dt)
        rows.append({
            "dtype": dt, "device": m.device, "measured_tflops": m.tflops, "best_shape": list(m.best_shape),
            "table_tflops": table, "table_source": source,
            "measured_over_table": (m.tflops / table) if table else None,
            "detail": m.as_dict(),
        })
    return rows


def format_peak_rows(rows: list[dict]) -> str:
    lines = [f"device: {rows[0]['device']}" if rows else "device: ?",
             f"{'dtype':<6} {'measured TFLOP/s':>17} {'at m,k,n':>16} {'table TFLOP/s':>14} {'measured/table':>15}"]
    for r in rows:
        table = f"{r['table_tflops']:.1f}" if r["table_tflops"] is not None else "unknown"
        ratio = f"{100 * r['measured_over_table']:.1f}%" if r["measured_over_table"] is not None else "-"
        shape = ",".join(map(str, r["best_shape"]))
        lines.append(f"{r['dtype']:<6} {r['measured_tflops']:>17.4f} {shape:>16} {table:>14} {ratio:>15}")
    if rows:
        lines.append(f"method: {rows[0]['detail']['method']}")
    return "\n".join(lines)


__all__ = ["measure_peak", "peak_report", "table_peak", "format_peak_rows", "PeakMeasurement", "DTYPES"]
