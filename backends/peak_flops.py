"""Dense peak FLOP/s per device, keyed by device-name patterns.

Figures are the vendors' dense numbers (never the 2:4-sparsity ones, which are 2x), per
device (one GPU / one NPU package as torch sees it). Each row cites its source. A device
that matches no row has no peak: MFU is then reported as unknown, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

TFLOPS = 1e12


@dataclass(frozen=True)
class PeakRow:
    pattern: str               # regex matched (case-insensitive) against the device name
    label: str                 # canonical device name used in reports ("table:<label>")
    tflops: dict[str, float]   # dtype name -> dense TFLOP/s
    source: str


# Order matters: the first matching row wins, so more specific names come first.
PEAK_TABLE: list[PeakRow] = [
    # Filled in by the HAL tables (see the rows below); placeholder header only.
]


def dtype_key(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                getattr(torch, "float8_e4m3fn", None): "fp8"}.get(dtype, str(dtype))
    d = dtype.lower()
    return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(d, d)


def match_row(device_name: str) -> PeakRow | None:
    for row in PEAK_TABLE:
        if re.search(row.pattern, device_name, re.IGNORECASE):
            return row
    return None


def lookup_peak_flops(device_name: str, dtype: str | torch.dtype) -> float | None:
    row = match_row(device_name)
    if row is None:
        return None
    t = row.tflops.get(dtype_key(dtype))
    return None if t is None else t * TFLOPS
