"""The heterogeneous pipeline engine: GPipe over micro-batches with explicit point-to-point
messages, so two sides of a boundary may use different tp, dp and micro-batch sizes.

torch.distributed.pipelining assumes one pp group in which every stage has the same tensor
parallel layout; here they differ, so the schedule is written out:

  forward, micro-batch k:  receive the pieces of my input → stage forward → send my output's pieces
  backward, micro-batch k: receive my output's gradient pieces → autograd.backward → send my input's

Between blocks the residual stream is sequence-sharded across a replica's tp ranks (rank t
holds positions [t·S/tp, (t+1)·S/tp) of its rows). At a boundary each sender shard goes
straight to every receiver shard whose rows and positions overlap it (layout.Message): no
gather on either side, every element crosses once, and the gradient retraces the same
messages. GPipe rather than 1F1B: the same bubble, a simpler dependency order (every rank
walks its micro-batches in ascending order in both phases, so no wait can form a cycle),
at the price of holding all of a step's activations.

The loss of a micro-batch is its token cross-entropy sum divided by the global token
count, so gradients add up across micro-batches, replicas and vendors with no rescaling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from suanli.infra.hetero.balance import compute_span
from suanli.infra.hetero.layout import HeteroPlan, Message, Role
from suanli.infra.model import cross_entropy_loss


@dataclass
class StepStats:
    """One step on one rank: where the time went and what crossed the bridge."""

    step_s: float = 0.0        # forward + backward + gradient sync, wall clock
    pipeline_s: float = 0.0    # forward + backward only
    busy_s: float = 0.0        # inside stage compute (the emulated slowdown included)
    sync_s: float = 0.0        # gradient synchronisation
    bridge: dict = field(default_factory=dict)      # host-bridge bytes / seconds / messages
    device_link: dict = field(default_factory=dict)  # same-vendor point-to-point
    dp_bridge: dict = field(default_factory=dict)    # cross-vendor gradient sums

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_s / self.pipeline_s if self.pipeline_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "bubble": self.bubble}


@dataclass
class _Micro:
    x: torch.Tensor | None = None      # the received input (a leaf), None on the first stage
    y: torch.Tensor | None = None      # the output (or the loss, on the last stage)


class HeteroPipeline:
    """This rank's part of the pipeline; `step()` runs one optimizer step's forward and backward."""

    def __init__(self, plan: HeteroPlan, role: Role, module: nn.Module, links, grad_sync, acc,
                 device: torch.device, dim: int, act_dtype: torch.dtype = torch.float32) -> None:
        self.plan, self.role, self.module = plan, role, module
        self.links = links            # peer rank -> DeviceLink | HostBridge
        self.grad_sync = grad_sync
        self.acc, self.device, self.dim, self.act_dtype = acc, device, dim, act_dtype
        s = role.stage
        self.has_first = s == 0
        self.has_last = s == plan.n_stages - 1
        self.counts = list(plan.layers)
        self.modules = [module]
        me = role.rank
        self.inbound = [m for m in plan.boundary(s - 1) if m.dst == me] if s > 0 else []
        self.outbound = [m for m in plan.boundary(s) if m.src == me] if not self.has_last else []
        self.last_stats = StepStats()
        self._tokens = plan.global_batch * plan.seq_len

    # ---- shapes of the pieces this rank holds
    def _piece(self, m: Message) -> tuple[int, int]:
        return m.rows[1] - m.rows[0], m.cols[1] - m.cols[0]

    def _tag(self, m: Message, backward: bool) -> int:
        return 2 * m.index + int(backward)

    def _recv_into(self, out: torch.Tensor, msgs: list[Message], rows_lo: int, peer_of, backward: bool) -> None:
        """Post every receive of one micro-batch, then place each piece as it completes."""
        c0 = self.role.cols[0]
        pending = []
        for m in msgs:
            nrows, ncols = self._piece(m)
            peer = peer_of(m)
            pending.append((m, self.links[peer].irecv((nrows, ncols, self.dim), self.act_dtype, peer,
                                                       self._tag(m, backward))))
        for m, handle in pending:
            piece = handle.wait()
            out[m.rows[0] - rows_lo:m.rows[1] - rows_lo, m.cols[0] - c0:m.cols[1] - c0].copy_(piece)

    def _send_from(self, src: torch.Tensor, msgs: list[Message], rows_lo: int, peer_of, backward: bool, sends) -> None:
        c0 = self.role.cols[0]
        for m in msgs:
            piece = src[m.rows[0] - rows_lo:m.rows[1] - rows_lo, m.cols[0] - c0:m.cols[1] - c0]
            peer = peer_of(m)
            sends.append(self.links[peer].isend(piece, peer, self._tag(m, backward)))

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> list[torch.Tensor]:
        """inputs / targets: the whole global batch (every rank gets the same rows; each
        replica takes its own). Returns, on last-stage ranks, one loss per micro-batch,
        scaled so that summing each last-stage replica's mean gives the global token mean
        (what the Trainer does with dp_size = 1); [] elsewhere.

        With tensor parallel on the last stage, call it under `loss_parallel()` (the
        Trainer does when `tensor_parallel` is true) so the vocabulary-sharded logits are
        never gathered; without it DTensor gathers them, which is correct but slower."""
        rep = self.role.replica
        start = time.perf_counter()
        busy = 0.0
        micros = [_Micro() for _ in rep.micro]
        sends: list = []
        local_cols = self.role.cols[1] - self.role.cols[0]
        losses: list[torch.Tensor] = []

        for k, (lo, hi) in enumerate(rep.micro):
            mine = [m for m in self.inbound if m.dst_micro == k]
            if self.has_first:
                x = inputs[lo:hi].to(self.device)
            else:
                x = torch.empty(hi - lo, local_cols, self.dim, dtype=self.act_dtype, device=self.device)
                self._recv_into(x, mine, lo, lambda m: m.src, backward=False)
                x.requires_grad_(True)
                micros[k].x = x
            t0 = time.perf_counter()
            with compute_span(self.acc):
                out = self.module(x)
                if self.has_last:
                    out = cross_entropy_loss(out, targets[lo:hi].to(self.device)) * ((hi - lo) * self.plan.seq_len
                                                                                      / self._tokens)
                self.acc.synchronize()
            busy += time.perf_counter() - t0
            micros[k].y = out
            if self.has_last:
                val = out.detach()
                val = val.full_tensor() if isinstance(val, DTensor) else val
                losses.append(val * len(rep.micro))
            else:
                if out.dtype != self.act_dtype:
                    raise RuntimeError(f"hetero pipeline: stage {self.role.stage} returned {out.dtype} activations but "
                                       f"the plan carries {self.act_dtype}; keep the residual stream in the "
                                       f"parameter dtype (autocast leaves it so)")
                self._send_from(out.detach(), [m for m in self.outbound if m.src_micro == k], lo,
                                lambda m: m.dst, backward=False, sends=sends)
        for s in sends:
            s.wait()
        sends.clear()

        for k, (lo, hi) in enumerate(rep.micro):
            mc = micros[k]
            if self.has_last:
                grad = None
            else:
                grad = torch.empty_like(mc.y)
                self._recv_into(grad, [m for m in self.outbound if m.src_micro == k], lo, lambda m: m.dst,
                                backward=True)
            t0 = time.perf_counter()
            with compute_span(self.acc):
                torch.autograd.backward(mc.y, grad)
                self.acc.synchronize()
            busy += time.perf_counter() - t0
            if mc.x is not None:
                self._send_from(mc.x.grad, [m for m in self.inbound if m.dst_micro == k], lo, lambda m: m.src,
                                backward=True, sends=sends)
            micros[k] = _Micro()   # free the activations as soon as they are done with
        for s in sends:
            s.wait()
        pipeline_s = time.perf_counter() - start

        t0 = time.perf_counter()
        self.grad_sync()
        self.acc.synchronize()
        sync_s = time.perf_counter() - t0
        self.last_stats = StepStats(time.perf_counter() - start, pipeline_s, busy, sync_s, **self._link_stats())
        return losses

    def _link_stats(self) -> dict:
        bridge, device = {}, {}
        seen = set()
        for link in self.links.values():
            if id(link) in seen:
                continue
            seen.add(id(link))
            into = bridge if link.crosses_vendors else device
            for k, v in link.stats.take().items():
                into[k] = into.get(k, 0) + v
        return {"bridge": bridge, "device_link": device, "dp_bridge": self.grad_sync.stats.take()}


__all__ = ["HeteroPipeline", "StepStats"]
