"""Huawei Ascend NPUs: torch_npu, HCCL, npu-smi health, CANN fused kernels.

torch_npu registers torch.npu (the CUDA-shaped device module) and the "hccl" process-group
backend when imported, so the base class does the generic work. This file adds the fused
attention and RMSNorm kernels, the vendor fused AdamW, the npu-smi parser and HCCL's
fail-fast environment.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from .base import Accelerator, DeviceHealth, _rms_norm_reference
from .tool_output import parse_number, remap_to_visible, run_tool

# Health words npu-smi prints in the NPU row; the chip row has a Bus-Id (or NA) there instead.
_HEALTH_WORDS = {"OK", "WARNING", "ALARM", "CRITICAL", "UNKNOWN"}

# npu_fusion_attention's sparse_mode 2 ("leftUpCausal") takes this compressed 2048x2048
# upper-triangle mask whatever the sequence length (torch_npu API reference, sparse_mode table:
# https://www.hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000850.html).
_CAUSAL_SPARSE_MODE = 2
_COMPRESSED_MASK_SIZE = 2048

# NpuFusedAdamW's signature: lr, betas, eps, weight_decay, amsgrad (torch_npu API reference).
_NPU_ADAMW_KWARGS = {"lr", "betas", "eps", "weight_decay", "amsgrad"}
# Options that only choose torch's implementation; meaningless to the vendor optimizer.
_IMPLEMENTATION_KWARGS = {"foreach", "fused", "capturable", "differentiable"}

_MIB = 1024 * 1024


def parse_npu_smi(text: str) -> list[DeviceHealth]:
    """`npu-smi info` -> one reading per chip. Each NPU is a pair of table rows:

        | 0     910B3   | OK            | 93.6   36   0    / 0           |   <- NPU: power, temp
        | 0             | 0000:C1:00.0  | 0      0    / 0   3339 / 65536 |   <- chip: AICore%, memory

    The chip row ends with "used / total" pairs: DDR memory, then HBM where the part has it;
    the last pair with a non-zero total is the device memory (MB in the tool, meaning MiB).
    Older formats put a Device id after the chip id ("Chip Device"); that id is the one
    ASCEND_RT_VISIBLE_DEVICES uses, otherwise the NPU id is. The process table that follows
    is ignored."""
    out: list[DeviceHealth] = []
    npu: dict[str, Any] | None = None
    for line in text.splitlines():
        if "Process id" in line or "Process name" in line:
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].split() or not cells[0].split()[0].isdigit():
            continue
        ids = cells[0].split()
        if cells[1].upper() in _HEALTH_WORDS:
            nums = cells[2].split()
            npu = {
                "id": int(ids[0]),
                "name": " ".join(ids[1:]) or None,
                "power": parse_number(nums[0]) if nums else None,
                "temp": parse_number(nums[1]) if len(nums) > 1 else None,
            }
            continue
        if npu is None:
            continue
        values = cells[2].split()
        pairs = [(int(u), int(t)) for u, t in re.findall(r"(\d+)\s*/\s*(\d+)", cells[2])]
        used, total = next(((u, t) for u, t in reversed(pairs) if t > 0), (None, None))
        out.append(DeviceHealth(
            index=int(ids[1]) if len(ids) > 1 and ids[1].isdigit() else npu["id"],
            name=npu["name"],
            temperature_c=npu["temp"],
            power_w=npu["power"],
            utilization_pct=parse_number(values[0]) if values else None,
            memory_used_bytes=None if used is None else used * _MIB,
            memory_total_bytes=None if total is None else total * _MIB,
            source="npu-smi",
        ))
    return out


class NPUAccelerator(Accelerator):
    name = "npu"
    device_type = "npu"
    comm_fallback = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    ray_resource = "NPU"
    vendor_package = "torch_npu"
    install_hint = "pip install torch-npu (the release matching your torch) on a host with the CANN toolkit and NPU driver"
    health_tool = "npu-smi"
    # HCCL_ASYNC_ERROR_HANDLING=1: torch_npu's watchdog ends the process on an HCCL error
    # instead of leaving the rank hung; already the default for torch >= 2.1, set so a site
    # profile cannot turn it off (hiascend.com/document/detail/zh/Pytorch/600/apiref/Envvariables/Envir_028.html).
    watchdog_vars = {"HCCL_ASYNC_ERROR_HANDLING": "1"}

    def __init__(self) -> None:
        super().__init__()
        self._causal_masks: dict[torch.device, torch.Tensor] = {}

    def watchdog_env(self, timeout_s: float | None = None) -> dict[str, str]:
        """With the process-group timeout known, keep HCCL's own timeouts below it: the HCCL
        docs advise init_process_group's timeout to exceed HCCL_CONNECT_TIMEOUT and
        HCCL_EXEC_TIMEOUT, so HCCL reports the real cause before torch's generic timeout.
        - HCCL_CONNECT_TIMEOUT: link setup wait, [120, 7200] s; HCCL waits 20 s more than set
          (CANN env reference envref_07_0149).
        - HCCL_EXEC_TIMEOUT: wait for peers inside a collective; default 1836 s. First-generation
          Atlas training parts round it down to a multiple of 68 s, minimum 68 (envref_07_0078)."""
        env = dict(self.watchdog_vars)
        if timeout_s:
            budget = int(timeout_s * 0.8)
            env["HCCL_CONNECT_TIMEOUT"] = str(min(7200, max(120, budget - 20)))
            env["HCCL_EXEC_TIMEOUT"] = str(max(68, budget))
        return env

    # ---- optimizer ----
    def _npu_fused_adamw_cls(self) -> Any:
        try:
            from torch_npu.optim import NpuFusedAdamW  # type: ignore
        except Exception:
            return None
        return NpuFusedAdamW

    def _vendor_fused_name(self) -> str | None:
        return "torch_npu.optim.NpuFusedAdamW" if self._npu_fused_adamw_cls() is not None else None

    def _vendor_fused_adamw(self, params: list, **kw: Any) -> torch.optim.Optimizer | None:
        cls = self._npu_fused_adamw_cls()
        kw = {k: v for k, v in kw.items() if k not in _IMPLEMENTATION_KWARGS}
        tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        # It fuses parameters into flat device buffers: only for NPU tensors and its own options.
        if cls is None or set(kw) - _NPU_ADAMW_KWARGS or any(p.device.type != "npu" for p in tensors):
            return None
        return cls(params, **kw)

    # ---- fused kernels ----
    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        if device not in self._causal_masks:
            ones = torch.ones(_COMPRESSED_MASK_SIZE, _COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device)
            self._causal_masks[device] = torch.triu(ones, diagonal=1)  # True = masked out
        return self._causal_masks[device]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        # The fused kernel is documented for fp16/bf16 on every CANN release; fp32 and
        # tensors elsewhere take torch's SDPA.
        if q.device.type != "npu" or q.dtype not in (torch.float16, torch.bfloat16):
            return super().attention(q, k, v, causal)
        import torch_npu  # type: ignore

        kwargs: dict[str, Any] = {"scale": 1.0 / math.sqrt(q.shape[-1]), "keep_prob": 1.0}
        if causal:
            kwargs.update(atten_mask=self._causal_mask(q.device), sparse_mode=_CAUSAL_SPARSE_MODE)
        return torch_npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", **kwargs)[0]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # npu_rms_norm requires gamma in the input's dtype; it returns (y, rstd).
        if x.device.type != "npu" or weight.dtype != x.dtype:
            return _rms_norm_reference(x, weight, eps)
        import torch_npu  # type: ignore

        return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]

    # ---- health ----
    def health(self) -> list[DeviceHealth]:
        text = run_tool(["npu-smi", "info"])
        readings = parse_npu_smi(text) if text else []
        if not readings:
            return super().health()
        return remap_to_visible(readings, os.environ.get(self.visible_devices_env))
