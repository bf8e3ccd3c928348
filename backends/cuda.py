"""NVIDIA GPUs: torch.cuda, NCCL, NVML health.

The generic device/memory/RNG/stream methods come from the base class through
torch.get_device_module("cuda"); this file holds what is specific to NVIDIA: refusing a
ROCm build of torch (which also answers torch.cuda), FP8 capability, NVML health, the
attention and RMSNorm kernels, and the fail-fast environment for ProcessGroupNCCL.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from typing import Any, Callable

import torch

from .base import Accelerator, Availability, DeviceHealth, _rms_norm_reference

# SDPA backends in order of preference. Flash and memory-efficient kernels are picked
# automatically on CUDA anyway; listing them pins the order and keeps MATH as the fallback
# for shapes/dtypes the fused kernels refuse (e.g. fp32 on some GPUs, odd head dims).
_SDPA_PREFERENCE = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")

# First compute capability with FP8 tensor cores (Ada 8.9, Hopper 9.0 and later).
_FP8_MIN_CAPABILITY = (8, 9)


def _sdpa_context() -> Any:
    """Context that sets the SDPA backend preference, or a no-op on a torch without it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    backends = [getattr(SDPBackend, n) for n in _SDPA_PREFERENCE if hasattr(SDPBackend, n)]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch before set_priority: the list is then an allow-list only
        return sdpa_kernel(backends)


@functools.lru_cache(maxsize=None)  # called every forward: look apex up once, not per layer
def _apex_rms_norm() -> Callable | None:
    """NVIDIA apex's fused RMSNorm, if apex was built with its CUDA extensions."""
    try:
        # The Python wrapper imports without the compiled kernel; require the kernel too.
        if importlib.util.find_spec("fused_layer_norm_cuda") is None:
            return None
        mod = importlib.import_module("apex.normalization.fused_layer_norm")
        return getattr(mod, "fused_rms_norm_affine", None)
    except Exception:  # not installed, or the unrelated PyPI "apex"
        return None


def nvml_readings(nvml: Any, handles: list[tuple[int, Any]]) -> list[DeviceHealth]:
    """One DeviceHealth per (torch index, NVML handle). Every query is independent: a GPU or
    driver that does not support one (ECC on consumer parts, power on some VMs) leaves that
    field None instead of failing the whole reading. `nvml` is the pynvml module, passed in
    so tests can hand a fake."""

    def ask(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:
            return None

    out = []
    for index, h in handles:
        name = ask(lambda: nvml.nvmlDeviceGetName(h))
        if isinstance(name, bytes):  # older bindings return bytes
            name = name.decode()
        temp = ask(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        power_mw = ask(lambda: nvml.nvmlDeviceGetPowerUsage(h))
        util = ask(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        mem = ask(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        ecc = {
            kind: ask(lambda k=kind: nvml.nvmlDeviceGetTotalEccErrors(
                h, getattr(nvml, f"NVML_MEMORY_ERROR_TYPE_{k}"), nvml.NVML_VOLATILE_ECC))
            for kind in ("CORRECTED", "UNCORRECTED")
        }
        out.append(DeviceHealth(
            index=index,
            name=name,
            temperature_c=None if temp is None else float(temp),
            power_w=None if power_mw is None else power_mw / 1000.0,
            utilization_pct=None if util is None else float(util.gpu),
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            ecc_errors_corrected=None if ecc["CORRECTED"] is None else int(ecc["CORRECTED"]),
            ecc_errors_uncorrected=None if ecc["UNCORRECTED"] is None else int(ecc["UNCORRECTED"]),
            source="nvml",
        ))
    return out


class CUDAAccelerator(Accelerator):
    name = "cuda"
    device_type = "cuda"
    comm_fallback = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    ray_resource = "GPU"
    vendor_package = None  # torch.cuda is part of torch
    install_hint = "install a CUDA build of torch, see https://pytorch.org/get-started/locally/, and the NVIDIA driver"
    health_tool = "nvml"
    # Why each variable (torch docs, 'PYTORCH ProcessGroupNCCL Environment Variables'):
    # - TORCH_NCCL_ASYNC_ERROR_HANDLING=3: when the watchdog sees a failed or timed-out
    #   collective, kill the process without first aborting the communicator. Aborting can
    #   itself hang on a wedged GPU; a dead process is what the supervisor restarts from.
    #   (Blocking wait is the wrong tool: it only raises in the thread that calls wait().)
    # - TORCH_NCCL_DUMP_ON_TIMEOUT=1 + TORCH_NCCL_TRACE_BUFFER_SIZE: the flight recorder
    #   writes which collective each rank was stuck in; the dump needs a non-zero buffer.
    # - TORCH_NCCL_ENABLE_MONITORING=1: a second thread kills the process if the watchdog
    #   itself stops heartbeating (a CUDA/NCCL call that never returns).
    # The collective timeout itself is init_process_group(timeout=...), set by suanli.init.
    watchdog_vars = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
    }

    @classmethod
    def probe(cls) -> Availability:
        # A ROCm build answers torch.cuda.is_available() too; it belongs to the rocm backend.
        if getattr(torch.version, "hip", None):
            return Availability(False, f"torch is a ROCm build (torch.version.hip={torch.version.hip}); use the 'rocm' backend")
        if getattr(torch.version, "cuda", None) is None:
            return Availability(False, f"torch {torch.__version__} was built without CUDA ({cls.install_hint})")
        return super().probe()

    # ---- dtypes ----
    def supports_fp8(self) -> bool:
        try:
            return tuple(torch.cuda.get_device_capability(self.current_device())) >= _FP8_MIN_CAPABILITY
        except Exception:
            return False

    # ---- health ----
    def _nvml_handles(self, nvml: Any) -> list[tuple[int, Any]]:
        """NVML numbers GPUs physically while torch numbers the visible ones, so match by UUID
        (torch >= 2.2 exposes it); fall back to equal indices when the UUID is unknown."""
        handles = []
        for i in range(self.device_count()):
            h = None
            try:
                h = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(i).uuid}")
            except Exception:  # no uuid on this torch, a MIG slice, or CUDA not initialisable
                pass
            handles.append((i, h if h is not None else nvml.nvmlDeviceGetHandleByIndex(i)))
        return handles

    def health(self) -> list[DeviceHealth]:
        try:
            import pynvml  # nvidia-ml-py; imported here so `import suanli` never needs it
        except ImportError:
            return super().health()
        try:
            pynvml.nvmlInit()
        except Exception:
            return super().health()
        try:
            return nvml_readings(pynvml, self._nvml_handles(pynvml))
        except Exception:
            return super().health()
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass

    # ---- fused kernels ----
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        if q.device.type != "cuda":
            return super().attention(q, k, v, causal)
        with _sdpa_context():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.device.type == "cuda" and weight.dtype == x.dtype:  # apex's plain variant wants one dtype
            apex_fn = _apex_rms_norm()
            if apex_fn is not None:
                return apex_fn(x, weight, tuple(weight.shape), eps)
        # torch's rms_norm upcasts half/bf16 to fp32 for the statistics, like the reference.
        torch_fn = getattr(torch.nn.functional, "rms_norm", None)
        if torch_fn is not None:
            return torch_fn(x, tuple(weight.shape), weight, eps)
        return _rms_norm_reference(x, weight, eps)
