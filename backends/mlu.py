"""Cambricon MLUs: torch_mlu, CNCL, cnmon health.

torch_mlu registers torch.mlu (the CUDA-shaped device module) and the "cncl" process-group
backend when imported; the base class does the generic work, so this file is data: the
identity table, CNCL's fail-fast variables and the cnmon field table.
"""

from __future__ import annotations

import os

from .base import Accelerator, DeviceHealth
from .tool_output import readings_from_report, remap_to_visible, run_tool

# `cnmon info` prints one "Card N" block per device in the nvidia-smi -q layout. Patterns
# are "Section/Key" paths, best first; a renamed key in a new driver is a one-line change.
CNMON_FIELDS = {
    "name": (r"Product Name",),
    "temperature_c": (r"Temperature/Board", r"Temperature/Chip", r"Temperature/.*"),
    "power_w": (r"Power Usage/Power", r"Power Usage/Usage", r"Power.*/Power"),
    "utilization_pct": (r"Utilization/MLU Average", r"Utilization/.*Average"),
    "memory_total_bytes": (r"Physical Memory Usage/Total", r"MLU Memory Usage/Total", r".*Memory Usage/Total"),
    "memory_used_bytes": (r"Physical Memory Usage/Used", r"MLU Memory Usage/Used", r".*Memory Usage/Used"),
    "ecc_errors_corrected": (r"ECC/Corrected Error", r"ECC/One Bit Error", r"ECC/.*Single.*"),
    "ecc_errors_uncorrected": (r"ECC/Uncorrectable Error", r"ECC/Multiple Bits? Error", r"ECC/.*Uncorrect.*"),
}
CNMON_DEVICE_HEADER = r"^Card\s+(\d+)\b"


def parse_cnmon_info(text: str) -> list[DeviceHealth]:
    """`cnmon info` -> one reading per card, keyed by the card number."""
    return readings_from_report(text, CNMON_DEVICE_HEADER, CNMON_FIELDS, "cnmon")


class MLUAccelerator(Accelerator):
    name = "mlu"
    device_type = "mlu"
    comm_fallback = "cncl"
    visible_devices_env = "MLU_VISIBLE_DEVICES"
    ray_resource = "MLU"  # not built into Ray: declare it as a custom resource on each node
    vendor_package = "torch_mlu"
    install_hint = "install Cambricon's torch_mlu wheel for your torch version, with the Neuware SDK and MLU driver"
    health_tool = "cnmon"
    # ProcessGroupCNCL mirrors ProcessGroupNCCL's watchdog. Releases differ in the name they
    # read (TORCH_CNCL_ASYNC_ERROR_HANDLING in current torch_mlu, CNCL_ASYNC_ERROR_HANDLING
    # in older ones), so both are set. Mode 1 (abort the communicator, then end the process)
    # is the one every release knows; torch_mlu's own default is 0, i.e. hang.
    watchdog_vars = {
        "TORCH_CNCL_ASYNC_ERROR_HANDLING": "1",
        "CNCL_ASYNC_ERROR_HANDLING": "1",
    }

    def health(self) -> list[DeviceHealth]:
        text = run_tool(["cnmon", "info"], timeout_s=10.0)  # cnmon info is slow on 8-card hosts
        readings = parse_cnmon_info(text) if text else []
        if not readings:
            return super().health()
        return remap_to_visible(readings, os.environ.get(self.visible_devices_env))
