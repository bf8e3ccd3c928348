"""Moore Threads GPUs: torch_musa, MCCL, mthreads-gmi health.

torch_musa registers torch.musa (the CUDA-shaped device module) and the "mccl"
process-group backend when imported; the base class does the generic work, so this file is
data: the identity table, MCCL's fail-fast variables and the mthreads-gmi field table.
"""

from __future__ import annotations

import os

from .base import Accelerator, DeviceHealth
from .tool_output import readings_from_report, remap_to_visible, run_tool

# `mthreads-gmi -q` follows the nvidia-smi -q layout: a "GPU <id or bus id>" line, then
# indented sections. Its JSON twin (-q --json) names the same keys ("FB Memory Usage/Used",
# "Temperature/GPU Current Temp", "Power Readings/Power Draw", "Utilization/Gpu").
MTHREADS_GMI_FIELDS = {
    "name": (r"Product Name",),
    "temperature_c": (r"Temperature/GPU Current Temp", r"Temperature/.*Temp"),
    "power_w": (r"Power Readings/Power Draw", r".*/Power Draw"),
    "utilization_pct": (r"Utilization/Gpu",),
    "memory_total_bytes": (r"FB Memory Usage/Total", r".*Memory Usage/Total"),
    "memory_used_bytes": (r"FB Memory Usage/Used", r".*Memory Usage/Used"),
    "ecc_errors_corrected": (r"ECC Errors/Volatile/.*(?<!Un)Correctable.*", r"ECC Errors/Volatile/Single Bit.*"),
    "ecc_errors_uncorrected": (r"ECC Errors/Volatile/.*Uncorrectable.*", r"ECC Errors/Volatile/Double Bit.*"),
}
# "GPU 0" or "GPU 00000000:4F:00.0"; with a bus id the device's "Index" field numbers it.
MTHREADS_GMI_DEVICE_HEADER = r"^GPU(?:\s+(\d+)|\s+[0-9A-Fa-f]+:[0-9A-Fa-f:.]+)\s*$"


def parse_mthreads_gmi(text: str) -> list[DeviceHealth]:
    """`mthreads-gmi -q` -> one reading per GPU."""
    return readings_from_report(text, MTHREADS_GMI_DEVICE_HEADER, MTHREADS_GMI_FIELDS, "mthreads-gmi")


class MUSAAccelerator(Accelerator):
    name = "musa"
    device_type = "musa"
    comm_fallback = "mccl"
    visible_devices_env = "MUSA_VISIBLE_DEVICES"
    ray_resource = "MUSA"  # not built into Ray: declare it as a custom resource on each node
    vendor_package = "torch_musa"
    install_hint = "install Moore Threads' torch_musa wheel for your torch version, with the MUSA toolkit and driver"
    health_tool = "mthreads-gmi"
    # ProcessGroupMCCL is a port of ProcessGroupNCCL and reads the same knobs under MCCL
    # names (current torch_musa: TORCH_MCCL_*, older: MCCL_*; both set):
    # - ASYNC_ERROR_HANDLING=3: on a failed or timed-out collective, end the process without
    #   aborting the communicator (an abort can hang on a wedged device).
    # - DUMP_ON_TIMEOUT with a trace buffer and the monitoring thread: record which
    #   collective hung; the dump needs TORCH_MCCL_ENABLE_MONITORING=1 and a buffer > 0.
    watchdog_vars = {
        "TORCH_MCCL_ASYNC_ERROR_HANDLING": "3",
        "MCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_MCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_MCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_MCCL_ENABLE_MONITORING": "1",
    }

    def health(self) -> list[DeviceHealth]:
        text = run_tool(["mthreads-gmi", "-q"], timeout_s=10.0)
        readings = parse_mthreads_gmi(text) if text else []
        if not readings:
            return super().health()
        return remap_to_visible(readings, os.environ.get(self.visible_devices_env))
