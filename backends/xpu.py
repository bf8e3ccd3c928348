"""Intel GPUs (Data Center GPU Max, Arc): torch.xpu, XCCL, xpu-smi health.

torch.xpu and the "xccl" process-group backend are built into torch's XPU wheels, so there
is no vendor package to import and the base class covers the device API. This file holds
the identity table and the xpu-smi reader.
"""

from __future__ import annotations

import csv
import io
import os
import re

import torch

from .base import Accelerator, DeviceHealth
from .tool_output import parse_number, remap_to_visible, run_tool

# xpu-smi dump metric ids (XPU Manager CLI guide, `xpu-smi dump -m`): 0 GPU utilization,
# 1 power, 3 core temperature, 18 memory used (MiB), 29/30 memory errors (un)correctable.
_DUMP_CMD = ["xpu-smi", "dump", "-d", "-1", "-m", "0,1,3,18,29,30", "-n", "1"]

# The CSV names its columns, so columns are found by name, not by the order requested.
_DUMP_COLUMNS = {
    "utilization_pct": r"GPU Utilization|utilization of all GPU Engines",
    "power_w": r"GPU Power",
    "temperature_c": r"GPU Core Temperature",
    "memory_used_bytes": r"GPU Memory Used",
    "ecc_errors_corrected": r"GPU Memory Errors Correctable",
    "ecc_errors_uncorrected": r"GPU Memory Errors Uncorrectable",
}


def parse_xpu_smi_dump(text: str) -> list[DeviceHealth]:
    """`xpu-smi dump -d -1 -m 0,1,3,18,29,30 -n 1` CSV -> one reading per device (device-level
    rows; per-tile rows, if a TileId column is present and set, are skipped)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("Timestamp")), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = [h.strip() for h in rows[0]]
    col = {h: i for i, h in enumerate(header)}
    out: dict[int, DeviceHealth] = {}
    for row in rows[1:]:
        cells = [c.strip() for c in row]
        if len(cells) != len(header) or not cells[col.get("DeviceId", 1)].isdigit():
            continue
        if "TileId" in col and cells[col["TileId"]] not in ("", "N/A"):
            continue
        values: dict = {}
        for attr, pattern in _DUMP_COLUMNS.items():
            idx = next((i for h, i in col.items() if re.search(pattern, h, re.IGNORECASE)), None)
            v = parse_number(cells[idx]) if idx is not None else None
            if v is not None and attr == "memory_used_bytes":
                v = int(v * 1024 * 1024)
            elif v is not None and attr.startswith("ecc_"):
                v = int(v)
            values[attr] = v
        dev = int(cells[col.get("DeviceId", 1)])
        out[dev] = DeviceHealth(index=dev, source="xpu-smi", **values)  # last sample wins
    return [out[k] for k in sorted(out)]


class XPUAccelerator(Accelerator):
    name = "xpu"
    device_type = "xpu"
    comm_fallback = "xccl"
    # ZE_AFFINITY_MASK is the Level Zero device filter, and the one Ray sets for Intel GPUs.
    visible_devices_env = "ZE_AFFINITY_MASK"
    ray_resource = "GPU"
    vendor_package = None  # torch.xpu ships in torch's XPU wheels
    install_hint = "install torch's XPU build with pip install torch --index-url https://download.pytorch.org/whl/xpu, and Intel GPU drivers"
    health_tool = "xpu-smi"
    # ProcessGroupXCCL's error-handling variables have changed between torch releases (only
    # the blocking-wait switch is common to all), so nothing is set: the collective timeout
    # from init_process_group and the health daemon's heartbeat catch hangs here.
    watchdog_vars = {}

    def health(self) -> list[DeviceHealth]:
        text = run_tool(_DUMP_CMD, timeout_s=10.0)
        readings = parse_xpu_smi_dump(text) if text else []
        if not readings:
            return super().health()
        readings = remap_to_visible(readings, os.environ.get(self.visible_devices_env))
        for r in readings:  # xpu-smi dump has no total-memory metric; torch knows it
            try:
                r.memory_total_bytes = int(torch.xpu.get_device_properties(r.index).total_memory)
            except Exception:
                pass
        return readings
