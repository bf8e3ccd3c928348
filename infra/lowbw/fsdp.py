"""Compressed gradient reduce-scatter for FSDP2 (`fully_shard`), through its public
`set_custom_reduce_scatter` seam: FSDP hands us the flat gradient of one FSDP unit
(world × chunk elements) and wants this rank's averaged chunk back.

- bf16 / fp16: cast, reduce-scatter in the wire dtype, cast back (what
  `MixedPrecisionPolicy(reduce_dtype=bf16)` would do, without rebuilding the model).
- int8 / fp8: quantize each destination chunk per block, `all_to_all` the codes and scales,
  dequantize and sum in fp32 on the owner (no 8-bit sums, no overflow). One error-feedback
  residual per FSDP unit (this object is per unit; FSDP reduces each unit once per step).

Scope: this replaces only the reduce-scatter over dp_shard. Under HSDP the all-reduce
across dp_replicate that follows is still torch's, in fp32. PowerSGD, DiLoCo and the
hierarchical all-reduce need whole (unsharded) gradients on each replica and therefore
replicated data parallel (DDP: parallel.dp_replicate > 1 with dp_shard = tp = pp = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from suanli.infra.lowbw.allreduce import reduce_scatter_into, ring_half_bytes
from suanli.infra.lowbw.codecs import BlockQuant, Residuals, make_codec
from suanli.infra.lowbw.pipeline_compress import ByteCounter


class CompressedReduceScatter:
    """Duck-types torch's FSDP `ReduceScatter` comm (allocate + __call__)."""

    def __init__(self, codec_name: str, block: int, error_feedback: bool, counter: ByteCounter) -> None:
        self.codec = make_codec(codec_name, block)
        self.residual = Residuals(error_feedback)
        self.counter = counter

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    @torch.no_grad()
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False):
        n = dist.get_world_size(group)
        if op == dist.ReduceOp.AVG:
            divide = n
        elif op == dist.ReduceOp.SUM:
            divide = 1
        else:
            raise RuntimeError(f"comm.grad: FSDP asked for reduce op {op}, which the compressed reduce-scatter does "
                               f"not implement; use comm.grad = \"fp32\" with this FSDP setup")
        if isinstance(self.codec, BlockQuant):
            out = self._quantized(input_tensor.float(), n, group)
        else:
            wire = (input_tensor / divide if divide > 1 else input_tensor).to(self.codec)
            out = torch.empty(wire.numel() // n, dtype=self.codec, device=wire.device)
            reduce_scatter_into(out, wire, op=dist.ReduceOp.SUM, group=group)
            self.counter.sent += ring_half_bytes(wire.numel() * wire.element_size(), n)
            divide = 1
        output_tensor.copy_(out / divide if divide > 1 else out)
        return None

    def _quantized(self, x: torch.Tensor, n: int, group: dist.ProcessGroup) -> torch.Tensor:
        q = self.codec
        chunk = x.numel() // n
        padded = q.padded(chunk)
        rows = torch.zeros(n, padded, dtype=torch.float32, device=x.device)
        rows[:, :chunk] = x.view(n, chunk)
        flat = self.residual.compensate("rs", rows.view(-1))
        codes, scales = q.quantize(flat)
        self.residual.update("rs", flat, q.dequantize(codes, scales))
        got_codes, got_scales = torch.empty_like(codes), torch.empty_like(scales)
        dist.all_to_all_single(got_codes, codes, group=group)
        dist.all_to_all_single(got_scales, scales, group=group)
        self.counter.sent += ring_half_bytes(q.wire_bytes(n * padded), n)
        return q.dequantize(got_codes, got_scales).view(n, padded).sum(0)[:chunk]


def install(modules, codec_name: str, block: int, error_feedback: bool, counter: ByteCounter) -> int:
    """Give every FSDP unit under `modules` its own compressed reduce-scatter. Returns how many."""
    from torch.distributed.fsdp import FSDPModule

    count = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, FSDPModule):
                m.set_custom_reduce_scatter(CompressedReduceScatter(codec_name, block, error_feedback, counter))
                count += 1
    return count
