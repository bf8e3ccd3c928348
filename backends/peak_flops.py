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


# Figures shared by several products (same silicon, same clocks, different memory or NVLink).
_HOPPER_SXM = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}
_HOPPER_PCIE = {"fp32": 51.2, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5, "fp8": 1513.0}
_HOPPER_NVL = {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}
_AMPERE_100 = {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}

_NV_DENSE = "dense = half of the datasheet's 'with sparsity' Tensor Core figure"

# Order matters: the first matching row wins, so more specific names come first.
# Patterns are matched against torch's get_device_name(): "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", "AMD Instinct MI300X",
# "Ascend910A", "MTT S4000". Look-arounds keep look-alikes out ("RTX A1000", "GH200").
PEAK_TABLE: list[PeakRow] = [
    # ---- NVIDIA Hopper ----
    PeakRow(r"H100 NVL", "H100 NVL", _HOPPER_NVL,
            f"NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column (per GPU); {_NV_DENSE}"),
    PeakRow(r"H100.*PCIe", "H100 PCIe", _HOPPER_PCIE,
            "NVIDIA H100 Tensor Core GPU Architecture whitepaper (v1.0x), H100 PCIe dense Tensor Core figures"),
    # Every other H100 name ("... 80GB HBM3", "... SXM5 ...") is the SXM part.
    PeakRow(r"H100", "H100 SXM", _HOPPER_SXM,
            "NVIDIA H100 Tensor Core GPU Architecture whitepaper (v1.0x), H100 SXM5 dense Tensor Core figures"),
    PeakRow(r"(?<!G)H200 NVL", "H200 NVL", _HOPPER_NVL,
            f"NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column; {_NV_DENSE}"),
    PeakRow(r"(?<!G)H200", "H200 SXM", _HOPPER_SXM,
            f"NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (same GH100 compute as H100 SXM); {_NV_DENSE}"),
    PeakRow(r"H800.*PCIe", "H800 PCIe", _HOPPER_PCIE,
            f"NVIDIA H800 PCIe datasheet (compute as H100 PCIe; FP64 and NVLink reduced); {_NV_DENSE}"),
    PeakRow(r"H800", "H800 SXM", _HOPPER_SXM,
            f"NVIDIA H800 SXM5 datasheet (compute as H100 SXM; FP64 and NVLink reduced); {_NV_DENSE}"),
    PeakRow(r"\bH20\b", "H20", {"fp32": 44.0, "tf32": 74.0, "bf16": 148.0, "fp16": 148.0, "fp8": 296.0},
            "NVIDIA HGX H20 product brief as reported by the press (Nov 2023; no public NVIDIA datasheet): "
            "FP32 44, TF32 74, FP16/BF16 148, FP8 296 TFLOPS, dense"),
    # ---- NVIDIA Ampere / Ada ----
    PeakRow(r"A800(?!\d)", "A800", _AMPERE_100,
            f"NVIDIA A800 datasheet (A100 compute with reduced NVLink; SXM4 and PCIe alike); {_NV_DENSE}"),
    PeakRow(r"A100(?!\d)", "A100", _AMPERE_100,
            f"NVIDIA A100 Tensor Core GPU datasheet (SXM4 and PCIe, 40GB and 80GB share these peaks); {_NV_DENSE}"),
    PeakRow(r"L40S", "L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0},
            f"NVIDIA L40S datasheet; {_NV_DENSE}"),
    # ---- AMD (torch sees one device per MI250/MI250X GCD, so those rows are per GCD) ----
    PeakRow(r"MI300X", "MI300X", {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9},
            "ROCm docs, 'AMD Instinct MI300 Series microarchitecture', peak-performance table for MI300X "
            "(dense; fp32 = matrix FP32, tf32 = the table's TF32 row)"),
    PeakRow(r"MI250X(?!/)", "MI250X (per GCD)", {"fp32": 47.85, "bf16": 191.5, "fp16": 191.5},
            "AMD Instinct MI250X datasheet: 383 TFLOPS FP16/BF16 and 95.7 TFLOPS matrix FP32 per OAM "
            "(= ROCm MI250 microarchitecture FLOPS/clock/CU x 220 CUs x 1.7 GHz), halved: one GCD per torch device"),
    PeakRow(r"(?<![/\w])MI250(?![X/\w])", "MI250 (per GCD)", {"fp32": 45.25, "bf16": 181.05, "fp16": 181.05},
            "ROCm docs, 'AMD Instinct MI250 microarchitecture', peak-performance table (362.1 TFLOPS FP16/BF16, "
            "90.5 matrix FP32 per OAM), halved: one GCD per torch device"),
    # ---- Huawei Ascend ----
    # Only the first-generation 910 has a vendor-published figure. "Ascend910B" (without a digit)
    # is a first-generation SoC name in CANN, not an A2 part, so it is deliberately not matched.
    PeakRow(r"^Ascend\s*910A$", "Ascend 910 (910A)", {"fp16": 256.0},
            "Huawei Ascend 910 launch announcement (23 Aug 2019): 256 TFLOPS FP16, 512 TOPS INT8; no BF16"),
    # ---- Moore Threads ----
    PeakRow(r"MTT S4000", "MTT S4000", {"fp32": 25.0, "tf32": 50.0, "bf16": 100.0, "fp16": 100.0},
            "Moore Threads MTT S4000 launch specifications (Dec 2023): FP32 25, TF32 50, FP16/BF16 100 TFLOPS, "
            "INT8 200 TOPS"),
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
