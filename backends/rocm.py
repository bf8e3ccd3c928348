"""AMD Instinct GPUs and Hygon DCUs: the ROCm build of torch.

ROCm torch keeps the CUDA-shaped API: device type "cuda", torch.cuda.*, and the "nccl"
process-group backend, which is RCCL underneath. So this class is the CUDA one with a
different probe (torch.version.hip must be set), visible-devices variable, FP8 rule and
health tool (rocm-smi, or Hygon's hy-smi, which is a rocm-smi fork).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from .base import Accelerator, Availability, DeviceHealth
from .tool_output import parse_number, remap_to_visible, run_tool
from .cuda import CUDAAccelerator
from .peak_flops import lookup_peak_flops

# GPU architectures (gcnArchName prefixes) with FP8 matrix cores: MI300 (gfx942), MI350 (gfx950).
_FP8_ARCH_PREFIXES = ("gfx94", "gfx95")

# MI250 and MI250X share a PCI id, so ROCm may name either "AMD Instinct MI250X/MI250".
# The compute-unit count of one GCD tells them apart (ROCm MI250 microarchitecture docs:
# 104 CUs per MI250 GCD; MI250X has 220 per OAM, 110 per GCD).
_NAME_BY_CU_COUNT = {"MI250X/MI250": {110: "AMD Instinct MI250X", 104: "AMD Instinct MI250"}}

# rocm-smi --json keys, per DeviceHealth field, in order of preference. Junction (hotspot)
# temperature is what throttles; edge is the fallback on cards that lack it. MI300 reports
# "Current Socket Graphics Package Power", older parts "Average Graphics Package Power".
_SMI_JSON_FIELDS = {
    "temperature_c": (r"Temperature \(Sensor junction\) \(C\)", r"Temperature \(Sensor edge\) \(C\)", r"Temperature.*\(C\)"),
    "power_w": (r".*Package Power \(W\)", r".*Power \(W\)"),
    "utilization_pct": (r"(GPU|DCU) use \(%\)",),
    "memory_total_bytes": (r"VRAM Total Memory \(B\)",),
    "memory_used_bytes": (r"VRAM Total Used Memory \(B\)",),
}

_SMI_ARGS = ["--showtemp", "--showpower", "--showuse", "--showmeminfo", "vram", "--json"]


def parse_rocm_smi_json(text: str) -> list[DeviceHealth]:
    """`rocm-smi --showtemp --showpower --showuse --showmeminfo vram --json` (and the same
    from hy-smi) -> readings keyed by the tool's card number."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return []
    out = []
    for card, fields in data.items():
        m = re.fullmatch(r"card(\d+)", card)
        if not m or not isinstance(fields, dict):
            continue
        values: dict[str, Any] = {}
        for attr, patterns in _SMI_JSON_FIELDS.items():
            for pat in patterns:
                hit = next((v for k, v in fields.items() if re.fullmatch(pat, k)), None)
                if parse_number(hit) is not None:
                    values[attr] = parse_number(hit)
                    break
        for attr in ("memory_total_bytes", "memory_used_bytes"):
            if attr in values:
                values[attr] = int(values[attr])
        name = fields.get("Card Series") or fields.get("Card series")
        out.append(DeviceHealth(index=int(m.group(1)), name=name, source="rocm-smi", **values))
    return sorted(out, key=lambda r: r.index)


def parse_hy_smi(text: str) -> list[DeviceHealth]:
    """Hygon `hy-smi` default table (the rocm-smi concise layout):

        DCU  Temp   AvgPwr  Perf  PwrCap  VRAM%  DCU%  Mode
        0    51.0C  142.0W  auto  400.0W  37%    88%   Normal

    Columns are found by their units rather than positions, because header cells may hold
    spaces ("Temp (Edge)") that break a positional split: the first degree value is the
    temperature, the first watt value the power draw (it precedes the power cap), and
    percentage cells are paired with the percentage headers in order."""
    pct_headers: list[str] | None = None
    out = []
    for line in text.splitlines():
        toks = line.split()
        if not toks:
            continue
        if toks[0] in ("DCU", "GPU", "Device") and any(t.endswith("%") for t in toks):
            pct_headers = [t.upper() for t in toks if t.endswith("%")]
            continue
        if pct_headers is None or not toks[0].isdigit():
            continue
        temp = next((parse_number(t) for t in toks[1:] if re.fullmatch(r"-?\d+(\.\d+)?°?C", t)), None)
        power = next((parse_number(t) for t in toks[1:] if re.fullmatch(r"\d+(\.\d+)?W", t)), None)
        pcts = [parse_number(t) for t in toks[1:] if re.fullmatch(r"\d+(\.\d+)?%", t)]
        named = dict(zip(pct_headers, pcts))
        util = next((v for k, v in named.items() if not k.startswith("VRAM")), None)
        out.append(DeviceHealth(index=int(toks[0]), temperature_c=temp, power_w=power,
                                utilization_pct=util, source="hy-smi"))
    return out


class ROCmAccelerator(CUDAAccelerator):
    name = "rocm"
    device_type = "cuda"     # ROCm torch reuses the CUDA device type and torch.cuda module
    comm_fallback = "nccl"   # RCCL registers under the name "nccl"
    # HIP_VISIBLE_DEVICES is what Ray sets for AMD GPUs (and Ray refuses ROCR_VISIBLE_DEVICES
    # alone). ROCR_VISIBLE_DEVICES filters one level lower, in the ROCr runtime, and is applied
    # first; if a site sets both, HIP indices count within the ROCR-visible set.
    visible_devices_env = "HIP_VISIBLE_DEVICES"
    ray_resource = "GPU"
    install_hint = "install a ROCm build of torch, see https://pytorch.org/get-started/locally/, or Hygon's DTK torch"
    health_tool = "rocm-smi"
    # Health tools in order: AMD's rocm-smi, then Hygon's fork as JSON, then its plain table.
    health_commands = (
        (["rocm-smi", *_SMI_ARGS], parse_rocm_smi_json),
        (["hy-smi", *_SMI_ARGS], parse_rocm_smi_json),
        (["hy-smi"], parse_hy_smi),
    )

    @classmethod
    def probe(cls) -> Availability:
        if not getattr(torch.version, "hip", None):
            return Availability(False, f"torch {torch.__version__} is not a ROCm build ({cls.install_hint})")
        # The generic torch.cuda check, skipping CUDAAccelerator's refusal of HIP builds.
        return super(CUDAAccelerator, cls).probe()

    def supports_fp8(self) -> bool:
        try:
            arch = str(torch.cuda.get_device_properties(self.current_device()).gcnArchName)
        except Exception:
            return False
        return arch.startswith(_FP8_ARCH_PREFIXES)

    def peak_flops(self, dtype: str | torch.dtype = "bf16", index: int = 0) -> float | None:
        try:
            name = self.device_name(index)
        except Exception:
            return None
        for ambiguous, by_cus in _NAME_BY_CU_COUNT.items():
            if ambiguous in name:
                cus = torch.cuda.get_device_properties(index).multi_processor_count
                if cus not in by_cus:
                    return None  # an unknown cut: no honest figure
                name = by_cus[cus]
        return lookup_peak_flops(name, dtype)

    def health(self) -> list[DeviceHealth]:
        visible = os.environ.get(self.visible_devices_env) or os.environ.get("CUDA_VISIBLE_DEVICES")
        for cmd, parse in self.health_commands:
            text = run_tool(cmd)
            readings = parse(text) if text else []
            if readings:
                return remap_to_visible(readings, visible)
        return Accelerator.health(self)
