"""Host and device readings for heartbeats: host metrics from psutil, device health from
the HAL (`Accelerator.health()`), both as protocol messages. Absent readings stay unset,
never a made-up zero."""

from __future__ import annotations

import os

import psutil

from suanli.fault.proto import health_pb2 as pb

_DEVICE_FIELDS = ("temperature_c", "power_w", "utilization_pct", "memory_used_bytes", "memory_total_bytes",
                  "ecc_errors_corrected", "ecc_errors_uncorrected")


def host_metrics(disk_path: str = "/") -> pb.HostMetrics:
    vm = psutil.virtual_memory()
    h = pb.HostMetrics(cpu_percent=psutil.cpu_percent(interval=None), memory_used_bytes=int(vm.total - vm.available),
                       memory_total_bytes=int(vm.total), disk_path=disk_path)
    try:
        du = psutil.disk_usage(disk_path)
        h.disk_free_bytes, h.disk_total_bytes = int(du.free), int(du.total)
    except OSError:
        pass
    try:
        h.load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        pass
    return h


def device_health(accelerator=None) -> list[pb.DeviceHealth]:
    """The HAL's readings for this process's accelerator; [] when it cannot tell."""
    try:
        if accelerator is None:
            from suanli.backends import get_accelerator

            accelerator = get_accelerator()
        readings = accelerator.health()
    except Exception:  # a broken vendor tool must not stop heartbeats
        return []
    out = []
    for r in readings:
        d = pb.DeviceHealth(index=r.index, name=r.name or "", source=r.source or "")
        for f in _DEVICE_FIELDS:
            v = getattr(r, f, None)
            if v is not None:
                setattr(d, f, v)
        out.append(d)
    return out
