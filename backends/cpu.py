"""CPU: the development backend. Same code paths as a GPU cluster, on gloo."""

from __future__ import annotations

from typing import Any

import torch

from .base import Accelerator, Availability, DeviceHealth


class _NullStream:
    """CPU work is synchronous; a stream context that does nothing keeps callers uniform."""

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def wait_stream(self, other: Any) -> None:
        return None


class _NullEvent:
    def record(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True


class CPUAccelerator(Accelerator):
    name = "cpu"
    device_type = "cpu"
    comm_fallback = "gloo"
    visible_devices_env = None
    ray_resource = "CPU"
    vendor_package = None
    install_hint = "always available"
    watchdog_vars = {}

    @classmethod
    def probe(cls) -> Availability:
        return Availability(True, "always available")

    @property
    def comm_backend(self) -> str:
        return "gloo"

    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        return None

    def current_device(self) -> int:
        return 0

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def device_name(self, index: int = 0) -> str:
        # The model name from /proc/cpuinfo, so reports say which CPU they ran on.
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        import platform

        return platform.processor() or "cpu"

    def synchronize(self, index: int | None = None) -> None:
        return None

    # CPU memory is the process's: report RSS so peak-memory numbers mean something.
    def memory_allocated(self, index: int | None = None) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def max_memory_allocated(self, index: int | None = None) -> int:
        import resource

        # ru_maxrss is in KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def memory_reserved(self, index: int | None = None) -> int:
        return self.memory_allocated(index)

    def total_memory(self, index: int = 0) -> int:
        import psutil

        return int(psutil.virtual_memory().total)

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        return None  # the kernel's high-water mark cannot be reset

    def empty_cache(self) -> None:
        return None

    def get_rng_state(self, index: int | None = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, index: int | None = None) -> None:
        torch.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    @property
    def has_streams(self) -> bool:
        return False

    def Stream(self, **kw: Any) -> Any:
        return _NullStream()

    def Event(self, **kw: Any) -> Any:
        return _NullEvent()

    def current_stream(self) -> Any:
        return _NullStream()

    def stream(self, s: Any) -> Any:
        return _NullStream()

    def supports_bf16(self) -> bool:
        return True

    def peak_flops(self, dtype: str | torch.dtype = "bf16", index: int = 0) -> float | None:
        # No honest table figure exists for an arbitrary CPU: `suanli bench peak` measures it.
        return None

    def health(self) -> list[DeviceHealth]:
        import psutil

        vm = psutil.virtual_memory()
        temp = None
        try:
            temps = psutil.sensors_temperatures() or {}
            vals = [t.current for ts in temps.values() for t in ts if t.current]
            temp = max(vals) if vals else None
        except (AttributeError, OSError):
            pass
        return [DeviceHealth(
            index=0,
            name=self.device_name(),
            temperature_c=temp,
            utilization_pct=psutil.cpu_percent(interval=None),
            memory_used_bytes=int(vm.total - vm.available),
            memory_total_bytes=int(vm.total),
            source="psutil",
        )]

    def watchdog_env(self, timeout_s: float | None = None) -> dict[str, str]:
        return {}
