"""suanli.backends: the hardware abstraction layer.

`get_accelerator()` is the one place a vendor is chosen:
  1. the SUANLI_ACCELERATOR env var (or the `name` argument), if set;
  2. otherwise each backend in PROBE_ORDER is probed and the first available wins;
  3. otherwise cpu.
Vendor packages (torch_npu, torch_mlu, torch_musa, pynvml, ...) are imported only inside a
probe, so `import suanli` on a CPU machine imports none of them.
"""

from __future__ import annotations

import importlib
import os

from .base import Accelerator, AcceleratorUnavailable, Availability, DeviceHealth, apply_watchdog_env

# name -> "module:Class". Data, not branches: adding a vendor is one row and one file.
BACKENDS: dict[str, str] = {
    "cpu": "suanli.backends.cpu:CPUAccelerator",
    "cuda": "suanli.backends.cuda:CUDAAccelerator",
    "rocm": "suanli.backends.rocm:ROCmAccelerator",
    "npu": "suanli.backends.npu:NPUAccelerator",
    "mlu": "suanli.backends.mlu:MLUAccelerator",
    "musa": "suanli.backends.musa:MUSAAccelerator",
    "xpu": "suanli.backends.xpu:XPUAccelerator",
}

# Domestic accelerators first: their torch plugins can coexist with a CUDA-less torch build,
# and a machine that has one of them has it on purpose. rocm before cuda because a ROCm
# torch also answers torch.cuda.is_available().
PROBE_ORDER: tuple[str, ...] = ("npu", "mlu", "musa", "rocm", "cuda", "xpu")

ENV_VAR = "SUANLI_ACCELERATOR"

_selected: Accelerator | None = None


def backend_class(name: str) -> type[Accelerator]:
    if name not in BACKENDS:
        raise AcceleratorUnavailable(
            f"unknown accelerator '{name}' (from {ENV_VAR} or config); choose one of: {', '.join(BACKENDS)}")
    mod_name, cls_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(mod_name), cls_name)


def register_backend(name: str, target: str) -> None:
    """Add a backend at run time ("module:Class"). It is never probed automatically;
    select it by name. Used for test accelerators and out-of-tree vendors."""
    BACKENDS[name] = target


def probe_all() -> list[dict]:
    """Every known backend with whether it is usable here and why (for `suanli doctor`)."""
    out = []
    for name in BACKENDS:
        try:
            av = backend_class(name).probe()
        except Exception as e:
            av = Availability(False, f"probe failed: {type(e).__name__}: {e}")
        out.append({"name": name, "available": av.available, "reason": av.reason})
    return out


def get_accelerator(name: str | None = None) -> Accelerator:
    """The accelerator for this process. With no name, the choice is made once and cached."""
    global _selected
    requested = name or os.environ.get(ENV_VAR) or None
    if requested is None and _selected is not None:
        return _selected
    if requested:
        cls = backend_class(requested.strip().lower())
        av = cls.probe()
        if not av.available:
            raise AcceleratorUnavailable(f"accelerator '{requested}' was requested but is not usable: {av.reason}")
        acc = cls()
    else:
        acc = None
        for n in PROBE_ORDER:
            try:
                cls = backend_class(n)
                if cls.probe().available:
                    acc = cls()
                    break
            except Exception:
                continue
        if acc is None:
            acc = backend_class("cpu")()
    if name is None:
        _selected = acc
    return acc


def reset_selection() -> None:
    """Forget the cached choice (tests change SUANLI_ACCELERATOR between cases)."""
    global _selected
    _selected = None


__all__ = [
    "Accelerator", "AcceleratorUnavailable", "Availability", "DeviceHealth", "BACKENDS", "PROBE_ORDER",
    "get_accelerator", "probe_all", "register_backend", "reset_selection", "apply_watchdog_env", "backend_class",
]
