"""Compress activations (forward) and their gradients (backward) at chosen pipeline stage
boundaries.

`torch.distributed.pipelining` sends whatever tensors a stage module returns and sends
back gradients of the same dtype and shape, but has no codec hook of its own. So the seam
is the stage module itself: a forward hook on the sending stage encodes its output, and a
forward pre-hook on the receiving stage decodes its input. Hooks (rather than a wrapper
module) keep the stage's module object unchanged, which FSDP and the pipeline stage both
rely on. Each side is a custom autograd Function, so the gradient travels compressed too:

- bf16: the output is cast to bf16 (its gradient is then bf16 on the wire as well) and
  cast back to fp32 on arrival: half the bytes each way.
- int8: each activation row (one token's hidden vector) is quantized with its own absmax
  scale; the int8 codes and the fp32 scale are packed into one tensor that pipelining
  carries as bf16-typed bytes (a tensor it can attach a gradient to). The receiver's
  backward packs the gradient the same way. (d + 4) bytes per token instead of 4·d.

Boundary b is between global stages b and b+1; a boundary whose two stages live on the
same rank (the V schedule's turn) moves no bytes and is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PACK_DTYPE = torch.bfloat16   # a 2-byte float type: pipelining sends it and gives it a gradient


@dataclass
class ByteCounter:
    sent: int = 0

    def take(self) -> int:
        n, self.sent = self.sent, 0
        return n


def pack_rows_int8(x: torch.Tensor) -> torch.Tensor:
    """(..., d) float → (..., ceil((d+4)/2)) PACK_DTYPE holding int8 codes + an fp32 row scale."""
    d = x.shape[-1]
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (xf / safe).round_().clamp_(-127, 127).to(torch.int8)
    parts = [codes, scale.contiguous().view(torch.int8)]
    if (d + 4) % 2:
        parts.append(torch.zeros(*x.shape[:-1], 1, dtype=torch.int8, device=x.device))
    return torch.cat(parts, dim=-1).view(PACK_DTYPE)


def unpack_rows_int8(p: torch.Tensor, d: int) -> torch.Tensor:
    raw = p.contiguous().view(torch.int8)
    scale = raw[..., d:d + 4].contiguous().view(torch.float32)
    return raw[..., :d].float() * scale


class _SendBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counter):
        ctx.dtype = x.dtype
        y = x.to(torch.bfloat16)
        counter.sent += y.numel() * 2
        return y

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype), None


class _RecvBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, counter):
        ctx.counter = counter
        return y.float()

    @staticmethod
    def backward(ctx, g):
        out = g.to(torch.bfloat16)
        ctx.counter.sent += out.numel() * 2
        return out, None


class _SendInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counter):
        ctx.d, ctx.dtype = x.shape[-1], x.dtype
        p = pack_rows_int8(x)
        counter.sent += p.numel() * p.element_size()
        return p

    @staticmethod
    def backward(ctx, g):
        return unpack_rows_int8(g, ctx.d).to(ctx.dtype), None


class _RecvInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, d, counter):
        ctx.counter = counter
        return unpack_rows_int8(p, d)

    @staticmethod
    def backward(ctx, g):
        p = pack_rows_int8(g)
        ctx.counter.sent += p.numel() * p.element_size()
        return p, None, None


@dataclass
class BoundaryCompression:
    mode: str                            # bf16 | int8
    dim: int                             # hidden size carried across the boundary
    counter: ByteCounter = field(default_factory=ByteCounter)
    handles: list = field(default_factory=list)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _SendBF16.apply(x, self.counter) if self.mode == "bf16" else _SendInt8.apply(x, self.counter)

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        return _RecvBF16.apply(y, self.counter) if self.mode == "bf16" else _RecvInt8.apply(y, self.dim, self.counter)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def compress_pipeline(pipeline, mode: str, dim: int, boundaries: list[int] | None = None) -> BoundaryCompression:
    """Register encode/decode hooks on this rank's stage modules of `pipeline` (infra.pipeline
    .Pipeline). `boundaries`: global stage indices b (boundary b→b+1); None or [] = all."""
    if mode not in ("bf16", "int8"):
        raise ValueError(f"comm.pp_compress: '{mode}' is not one of none, bf16, int8")
    n_stages = pipeline.stages[0].num_stages
    wanted = set(range(n_stages - 1)) if not boundaries else set(boundaries)
    bad = sorted(b for b in wanted if not 0 <= b < n_stages - 1)
    if bad:
        raise ValueError(f"comm.pp_compress_boundaries: {bad} out of range; with {n_stages} stages a boundary is "
                         f"0..{n_stages - 2} (b = between stages b and b+1)")
    local = {s.stage_index for s in pipeline.stages}
    comp = BoundaryCompression(mode, dim)
    for stage in pipeline.stages:
        s, mod = stage.stage_index, stage.submod
        if s in wanted and s + 1 not in local:
            comp.handles.append(mod.register_forward_hook(lambda m, args, out: comp.encode(out)))
        if s - 1 in wanted and s - 1 not in local:
            comp.handles.append(mod.register_forward_pre_hook(
                lambda m, args: (comp.decode(args[0]),) + tuple(args[1:])))
    return comp
