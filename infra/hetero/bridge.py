"""Point-to-point transport between pipeline stages: a device link inside one vendor's group,
and the host-staged bridge between vendors.

NCCL, HCCL and CNCL cannot talk to each other, but every rank has gloo and a host. So a
tensor crossing vendors goes device → (pinned) host buffer → gloo send → host buffer →
device, optionally compressed on the device before it leaves (bf16 halves the bytes; int8
sends one byte per element plus an fp32 scale per row, reusing the low-bandwidth
pipeline codec). Gradients travel back through the same codec.

Both transports hand out handles whose `wait()` finishes the transfer, so the engine can
post all receives of a micro-batch before waiting on any. Every bridge transfer is counted
(bytes on the wire, seconds spent staging and waiting) for the per-step report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

BRIDGE_CODECS = ("none", "bf16", "int8")


class Codec:
    """How an activation (or its gradient) is put on the bridge: (..., d) float rows."""

    name = "none"

    def wire(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
        return shape, dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, w: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return w


class BF16Codec(Codec):
    name = "bf16"

    def wire(self, shape, dtype):
        return shape, torch.bfloat16

    def encode(self, x):
        return x.to(torch.bfloat16)

    def decode(self, w, shape, dtype):
        return w.to(dtype)


class Int8RowCodec(Codec):
    """int8 codes with one fp32 absmax scale per row (one token's hidden vector), from the
    low-bandwidth pipeline codec: (d + 4) bytes per token instead of 4 d."""

    name = "int8"

    def wire(self, shape, dtype):
        return (*shape[:-1], (shape[-1] + 5) // 2), torch.bfloat16

    def encode(self, x):
        from suanli.infra.lowbw.pipeline_compress import pack_rows_int8

        return pack_rows_int8(x)

    def decode(self, w, shape, dtype):
        from suanli.infra.lowbw.pipeline_compress import unpack_rows_int8

        return unpack_rows_int8(w, shape[-1]).to(dtype)


CODECS: dict[str, type[Codec]] = {"none": Codec, "bf16": BF16Codec, "int8": Int8RowCodec}


def make_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"hetero.bridge_compress: '{name}' is not one of {', '.join(BRIDGE_CODECS)}")
    return CODECS[name]()


@dataclass
class LinkStats:
    """Per rank. stage_s: the bridge's own work (encoding, device<->host copies, decoding).
    wait_s: blocked on a transfer, which includes waiting for the peer to get there, so it
    is an upper bound on time on the wire."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    messages: int = 0
    stage_s: float = 0.0
    wait_s: float = 0.0

    def take(self) -> dict:
        out = dict(self.__dict__)
        self.bytes_sent = self.bytes_recv = self.messages = 0
        self.stage_s = self.wait_s = 0.0
        return out


class _Sent:
    def __init__(self, work, keep: torch.Tensor, stats: LinkStats) -> None:
        self.work, self.keep, self.stats = work, keep, stats

    def wait(self) -> None:
        start = time.perf_counter()
        self.work.wait()
        self.keep = None
        self.stats.wait_s += time.perf_counter() - start


class _Received:
    def __init__(self, work, buf: torch.Tensor, finish, stats: LinkStats) -> None:
        self.work, self.buf, self.finish, self.stats = work, buf, finish, stats

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        self.work.wait()
        staged = time.perf_counter()
        out = self.finish(self.buf)
        self.stats.wait_s += staged - start
        self.stats.stage_s += time.perf_counter() - staged
        return out


class DeviceLink:
    """Inside one device group: device tensors on the vendor's own backend, no staging."""

    crosses_vendors = False

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group, self.device = group, device
        self.stats = LinkStats()

    def isend(self, x: torch.Tensor, dst: int, tag: int) -> _Sent:
        x = x.detach().contiguous()
        self.stats.bytes_sent += x.numel() * x.element_size()
        self.stats.messages += 1
        return _Sent(dist.isend(x, dst, group=self.group, tag=tag), x, self.stats)

    def irecv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int) -> _Received:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self.stats.bytes_recv += buf.numel() * buf.element_size()
        return _Received(dist.irecv(buf, src, group=self.group, tag=tag), buf, lambda b: b, self.stats)


class HostBridge:
    """Between device groups: device → host → gloo → host → device, through `codec`."""

    crosses_vendors = True

    def __init__(self, group: dist.ProcessGroup, device: torch.device, codec: Codec) -> None:
        self.group, self.device, self.codec = group, device, codec
        # Pinned host buffers make the device copies asynchronous DMA; a CPU "device" has
        # nothing to stage (and pinning needs an accelerator).
        self.pin = device.type != "cpu"
        self.stats = LinkStats()

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t.contiguous()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        host.copy_(t)
        return host

    def isend(self, x: torch.Tensor, dst: int, tag: int) -> _Sent:
        start = time.perf_counter()
        host = self._host(self.codec.encode(x.detach()))
        self.stats.bytes_sent += host.numel() * host.element_size()
        self.stats.messages += 1
        self.stats.stage_s += time.perf_counter() - start
        work = dist.isend(host, dst, group=self.group, tag=tag)
        return _Sent(work, host, self.stats)

    def irecv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int) -> _Received:
        wshape, wdtype = self.codec.wire(tuple(shape), dtype)
        host = torch.empty(wshape, dtype=wdtype, pin_memory=self.pin)
        self.stats.bytes_recv += host.numel() * host.element_size()
        work = dist.irecv(host, src, group=self.group, tag=tag)

        def finish(buf: torch.Tensor) -> torch.Tensor:
            return self.codec.decode(buf.to(self.device, non_blocking=self.pin), tuple(shape), dtype)

        return _Received(work, host, finish, self.stats)


__all__ = ["BRIDGE_CODECS", "Codec", "DeviceLink", "HostBridge", "LinkStats", "make_codec"]
