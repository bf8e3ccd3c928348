"""The `Accelerator` contract: the one place that knows a vendor.

Every vendor class (cpu, cuda, rocm, npu, mlu, musa, xpu) has the same method set. Most of
it is generic: torch exposes each out-of-tree device as a module (`torch.npu`, `torch.mlu`,
...) with the CUDA-shaped API, so the base class asks `torch.get_device_module(device_type)`
and a vendor class is mostly a table of facts plus the few places it really differs
(peak FLOPS, health tool, fused kernels, watchdog env).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .peak_flops import lookup_peak_flops


class AcceleratorUnavailable(RuntimeError):
    """The requested backend cannot run here; the message names what to install or check."""


@dataclass
class DeviceHealth:
    """One reading of a device's health. A field is None when the vendor tool is absent,
    never a made-up zero."""

    index: int
    name: str | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    ecc_errors_corrected: int | None = None
    ecc_errors_uncorrected: int | None = None
    source: str = "none"  # which tool produced the reading: "nvml", "npu-smi", "psutil", ...

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Availability:
    available: bool
    reason: str


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the input dtype: bf16 mean-of-squares loses too much.
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return out.type_as(x) * weight


class Accelerator:
    """Base class. Subclasses set the identity table below and override what differs."""

    # ---- identity (data, filled by each vendor class) ----
    name: str = "base"                     # suanli's name for the backend
    device_type: str = "cpu"               # torch device type
    comm_fallback: str = "gloo"            # collective backend when torch's map does not know the device
    visible_devices_env: str | None = None  # e.g. CUDA_VISIBLE_DEVICES
    ray_resource: str | None = None        # Ray resource that counts these devices ("GPU", "NPU", ...)
    vendor_package: str | None = None      # module imported lazily when probed ("torch_npu")
    install_hint: str = ""                 # what to install when the package is missing
    health_tool: str | None = None         # command-line tool parsed by health()
    # env vars that make the collective library fail fast instead of hanging
    watchdog_vars: dict[str, str] = {}

    def __init__(self) -> None:
        self._module_cache: Any = None

    # ---- probing ----
    @classmethod
    def probe(cls) -> Availability:
        """Is this backend usable here? Imports the vendor package only now, never at import."""
        if cls.vendor_package is not None:
            if importlib.util.find_spec(cls.vendor_package) is None:
                return Availability(False, f"python package '{cls.vendor_package}' is not installed ({cls.install_hint})")
            try:
                importlib.import_module(cls.vendor_package)
            except Exception as e:  # a broken vendor install must not break `suanli doctor`
                return Availability(False, f"importing '{cls.vendor_package}' failed: {type(e).__name__}: {e}")
        mod = getattr(torch, cls.device_type, None)
        if mod is None or not hasattr(mod, "is_available"):
            return Availability(False, f"torch has no '{cls.device_type}' device module")
        try:
            ok = bool(mod.is_available()) and mod.device_count() > 0
        except Exception as e:
            return Availability(False, f"torch.{cls.device_type}.is_available() failed: {e}")
        if not ok:
            return Availability(False, f"no {cls.device_type} device visible to torch")
        return Availability(True, f"{mod.device_count()} device(s)")

    @property
    def module(self) -> Any:
        """torch's device module for this backend (torch.cuda, torch.npu, ...)."""
        if self._module_cache is None:
            if self.vendor_package:
                importlib.import_module(self.vendor_package)
            self._module_cache = torch.get_device_module(self.device_type)
        return self._module_cache

    # ---- identity ----
    @property
    def comm_backend(self) -> str:
        """Collective backend for this device, asking torch first (vendor plugins register
        themselves there), then the class's own table entry."""
        known = torch.distributed.Backend.default_device_backend_map if torch.distributed.is_available() else {}
        return known.get(self.device_type, self.comm_fallback)

    # ---- device ----
    def is_available(self) -> bool:
        return self.probe().available

    def device_count(self) -> int:
        return int(self.module.device_count())

    def set_device(self, index: int) -> None:
        self.module.set_device(index)

    def current_device(self) -> int:
        return int(self.module.current_device())

    def device(self, index: int | None = None) -> torch.device:
        return torch.device(self.device_type, self.current_device() if index is None else index)

    def device_name(self, index: int = 0) -> str:
        return str(self.module.get_device_name(index))

    def synchronize(self, index: int | None = None) -> None:
        self.module.synchronize(index)

    # ---- memory ----
    def memory_allocated(self, index: int | None = None) -> int:
        return int(self.module.memory_allocated(index))

    def max_memory_allocated(self, index: int | None = None) -> int:
        return int(self.module.max_memory_allocated(index))

    def memory_reserved(self, index: int | None = None) -> int:
        return int(self.module.memory_reserved(index))

    def total_memory(self, index: int = 0) -> int:
        return int(self.module.get_device_properties(index).total_memory)

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        self.module.reset_peak_memory_stats(index)

    def empty_cache(self) -> None:
        self.module.empty_cache()

    # ---- RNG ----
    def get_rng_state(self, index: int | None = None) -> torch.Tensor:
        return self.module.get_rng_state(self.current_device() if index is None else index)

    def set_rng_state(self, state: torch.Tensor, index: int | None = None) -> None:
        self.module.set_rng_state(state, self.current_device() if index is None else index)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.module.manual_seed_all(seed)

    # ---- streams and events ----
    @property
    def has_streams(self) -> bool:
        return hasattr(self.module, "Stream")

    def Stream(self, **kw: Any) -> Any:
        return self.module.Stream(**kw)

    def Event(self, **kw: Any) -> Any:
        return self.module.Event(**kw)

    def current_stream(self) -> Any:
        return self.module.current_stream()

    def stream(self, s: Any) -> Any:
        """Context manager that makes `s` the current stream."""
        return self.module.stream(s)

    # ---- dtypes ----
    def supports_bf16(self) -> bool:
        f = getattr(self.module, "is_bf16_supported", None)
        return bool(f()) if f else True

    def supports_fp16(self) -> bool:
        return True

    def supports_fp8(self) -> bool:
        return False

    def supported_dtypes(self) -> list[str]:
        out = ["fp32"]
        if self.supports_bf16():
            out.append("bf16")
        if self.supports_fp16():
            out.append("fp16")
        if self.supports_fp8():
            out.append("fp8")
        return out

    # ---- performance facts ----
    def peak_flops(self, dtype: str | torch.dtype = "bf16", index: int = 0) -> float | None:
        """Dense peak FLOP/s of one device for `dtype`, from the table in peak_flops.py.
        None when the device is not in the table: MFU is then "unknown", never guessed."""
        try:
            name = self.device_name(index)
        except Exception:
            return None
        return lookup_peak_flops(name, dtype)

    # ---- optimizer ----
    def fused_adamw(self, params: Iterable[torch.nn.Parameter], **kw: Any) -> torch.optim.Optimizer:
        """The fastest correct AdamW here: NVIDIA apex FusedAdam if built, then the vendor's
        fused optimizer, then torch's fused / foreach implementation."""
        params = list(params)
        opt = self._apex_fused_adamw(params, **kw) or self._vendor_fused_adamw(params, **kw)
        if opt is not None:
            return opt
        return self._torch_adamw(params, **kw)

    def fused_adamw_kind(self) -> str:
        """Which implementation fused_adamw() picks, for doctor and the benchmark report."""
        if self._apex_available():
            return "apex.FusedAdam"
        if self._vendor_fused_name():
            return self._vendor_fused_name()  # type: ignore[return-value]
        return "torch.AdamW(fused)" if self._torch_fused_ok() else "torch.AdamW(foreach)"

    def _apex_available(self) -> bool:
        # The registry package called "apex" is an unrelated web toolkit, so look for the
        # module NVIDIA apex actually ships rather than the top-level name.
        if self.device_type not in ("cuda",):
            return False
        return importlib.util.find_spec("apex") is not None and importlib.util.find_spec("apex.optimizers") is not None

    def _apex_fused_adamw(self, params: list, **kw: Any) -> torch.optim.Optimizer | None:
        if not self._apex_available():
            return None
        try:
            from apex.optimizers import FusedAdam  # type: ignore
        except Exception:
            return None
        return FusedAdam(params, adam_w_mode=True, **kw)

    def _vendor_fused_name(self) -> str | None:
        return None

    def _vendor_fused_adamw(self, params: list, **kw: Any) -> torch.optim.Optimizer | None:
        return None

    def _torch_fused_ok(self) -> bool:
        return self.device_type in ("cuda", "cpu", "xpu", "mps") or self.device_type == "privateuseone"

    def _torch_adamw(self, params: list, **kw: Any) -> torch.optim.Optimizer:
        kw = dict(kw)
        if self._torch_fused_ok():
            try:
                return torch.optim.AdamW(params, fused=True, **kw)
            except (RuntimeError, TypeError, ValueError):
                pass  # e.g. DTensor params or dtypes the fused kernel does not take
        return torch.optim.AdamW(params, foreach=True, **kw)

    # ---- health ----
    def health(self) -> list[DeviceHealth]:
        """One reading per visible device; fields are None where no tool can tell."""
        try:
            n = self.device_count()
        except Exception:
            n = 0
        return [DeviceHealth(index=i) for i in range(n)]

    # ---- fused kernels the reference model calls ----
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """q, k, v: (batch, heads, seq, head_dim), k/v already expanded to q's heads."""
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _rms_norm_reference(x, weight, eps)

    # ---- fail-fast collectives ----
    def watchdog_env(self, timeout_s: float | None = None) -> dict[str, str]:
        """Env vars to set before init_process_group so a broken collective errors out
        instead of hanging. Values already set by the user win (see apply_watchdog_env)."""
        return dict(self.watchdog_vars)

    def __repr__(self) -> str:
        return f"<Accelerator {self.name} device_type={self.device_type} comm={self.comm_backend}>"


def apply_watchdog_env(acc: Accelerator, environ: dict[str, str], timeout_s: float | None = None) -> dict[str, str]:
    """Set the accelerator's fail-fast env vars that the user has not set; return what was set."""
    applied = {}
    for k, v in acc.watchdog_env(timeout_s).items():
        if k not in environ:
            environ[k] = v
            applied[k] = v
    return applied
