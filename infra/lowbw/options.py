"""`CommOptions`: the low-bandwidth options of one training job behind the narrow seam the
trainer calls, and `attach_comm_options(trainer)` that builds it from `[comm]`.

The seam (the trainer's side, in order, once per optimizer step):

    if comm.skip_builtin_sync: run every micro-batch under DDP no_sync() /
                               FSDP set_requires_gradient_sync(False)
    ... forward / backward ...
    comm_bytes  = comm.after_backward(params)        # leaves the averaged gradient on every replica
    ... clip, optimizer.step() ...
    comm_bytes += comm.after_optimizer_step(step, params)   # DiLoCo's outer step every H steps
    metrics["comm_bytes"] = comm_bytes

`step` is the 1-based number of optimizer steps done, this one included (the trainer's
self.step + 1 before it increments). `skip_builtin_sync` does not change during a run.

Checkpoints: `state_dict()` is this rank's comm state (error-feedback residuals, DiLoCo's
outer copy, momentum, replica weights and inner optimizer state, PowerSGD's Q and error),
different on every rank, so the checkpoint keeps it per rank (TrainState.per_rank). The
trainer holds a `CommCheckpoint` slot from the start; attach_comm_options binds the options
to it (`trainer.comm_checkpoint`), applying a state the resume loaded before they existed.
torch's bf16/fp16 DDP hooks have no state; powerSGD_hook's (residuals, warm-start P/Q, its
iteration and RNG) is the part "powersgd_ddp", kept per parameter (ddp_hook_state.py).

`comm_bytes` is what this rank sent in the step to synchronize gradients (DiLoCo: pseudo-
gradients), plus compressed pipeline-boundary traffic when comm.pp_compress is on, counted
as the ring algorithm sends it (allreduce.py). FSDP's parameter all-gathers are not
gradient sync and are not counted; where torch does the sync itself (fp32 DDP/FSDP) the
figure is computed from the gradient sizes, not measured.

Which path each option takes, by data-parallel kind (parallelize.data_parallel_kind):

    option              ddp (replicated)                     fsdp / hsdp
    fp32                torch's all-reduce (counted)         torch's reduce-scatter (counted)
    bf16, fp16          torch's DDP comm hook                compressed reduce-scatter (fsdp.py)
    int8, fp8           suanli RS+AG all-reduce (manual)     compressed reduce-scatter (fsdp.py)
    powersgd            torch's powerSGD_hook                not supported (error)
    diloco              suanli DiLoCo (manual)               not supported (error)
    hierarchical        suanli hierarchical (manual)         not supported (error)

FSDP/HSDP reduce-scatter is torch's: only its wire dtype can change (fsdp.py), and under
HSDP the replicate all-reduce stays fp32. Options that need whole gradients per replica
need replicated data parallel (DDP) or the manual path. `comm.ddp_hooks = false` sends
bf16/fp16/powersgd under DDP through suanli's own implementation instead of torch's hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from suanli.infra.lowbw.allreduce import (FlatReducer, HierarchicalReducer, Reducer, average_tensors_,
                                          build_hierarchy, data_parallel_groups, dedicated_group, load_reducer_state,
                                          node_ids, reducer_state, ring_allreduce_bytes, ring_half_bytes)
from suanli.infra.lowbw.ddp_hook_state import PowerSGDHookStates
from suanli.infra.lowbw.pipeline_compress import BoundaryCompression, ByteCounter, compress_pipeline


@dataclass
class CommOptions:
    """What the trainer holds. Build with attach_comm_options(trainer)."""

    skip_builtin_sync: bool = False
    describe_path: str = "none"
    sync: Callable[[list[torch.nn.Parameter]], int] | None = None      # manual gradient averaging
    outer: Callable[[int], int] | None = None                           # DiLoCo after_optimizer_step
    counter: ByteCounter = field(default_factory=ByteCounter)           # hooks add what they send
    estimate: Callable[[], int] | None = None                           # bytes torch's own sync sends
    pipeline: BoundaryCompression | None = None
    details: dict = field(default_factory=dict)                         # JSON-able, for summaries
    parts: dict = field(default_factory=dict)                           # the live objects, for tests

    def after_backward(self, params) -> int:
        sent = self.sync(list(params)) if self.sync is not None else 0
        if self.estimate is not None:
            sent += self.estimate()
        sent += self.counter.take()
        if self.pipeline is not None:
            sent += self.pipeline.counter.take()
        return int(sent)

    def after_optimizer_step(self, step: int, params=None) -> int:
        return int(self.outer(step)) if self.outer is not None else 0

    def describe(self) -> dict:
        return {"path": self.describe_path, "skip_builtin_sync": self.skip_builtin_sync, **self.details}

    def state_dict(self) -> dict:
        """This rank's comm state (per rank: residuals and DiLoCo replicas differ), by part."""
        return {name: _part_state(part) for name, part in self.parts.items() if _part_state(part) is not None}

    def load_state_dict(self, sd: dict) -> list[str]:
        """Restore what `state_dict` saved; returns notes on what could not apply."""
        notes = []
        for name, part in self.parts.items():
            if name not in sd:
                if _part_state(part) is not None:
                    notes.append(f"comm state: {name} not in the checkpoint, starts fresh")
                continue
            if isinstance(part, (FlatReducer, HierarchicalReducer)):
                load_reducer_state(part, sd[name])
            else:
                part.load_state_dict(sd[name])
        return notes

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.remove()
        if "diloco" in self.parts:
            self.parts["diloco"].close()


def _part_state(part):
    if isinstance(part, (FlatReducer, HierarchicalReducer)):
        return reducer_state(part)
    return part.state_dict() if hasattr(part, "state_dict") else None


class CommCheckpoint:
    """The checkpoint's per-rank entry for the comm options (TrainState.per_rank["comm"]).

    It exists before the options do: the trainer resumes from a checkpoint first and builds
    its CommOptions after (they read the resumed step), so a state loaded before `bind` is
    held and applied when the options are bound; once bound, saves and loads (a rollback)
    go straight to the live options."""

    def __init__(self) -> None:
        self.live: CommOptions | None = None
        self.pending: dict | None = None
        self.notes: list[str] = []

    def state_dict(self) -> dict:
        if self.live is not None:
            return self.live.state_dict()
        return self.pending or {}

    def load_state_dict(self, sd: dict) -> None:
        if self.live is not None:
            self.notes = self.live.load_state_dict(sd)
        else:
            self.pending = sd

    def bind(self, opts: CommOptions) -> None:
        self.live = opts
        if self.pending is not None:
            self.notes = opts.load_state_dict(self.pending)
            self.pending = None


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    # A parameter unused this step still takes part, as zeros: every replica must post the
    # same collectives.
    out = []
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
    return out


def _local_numel(p: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def make_reducer(ctx, codec: str, block: int, error_feedback: bool, hierarchical: bool, node_size: int,
                 dedicated: bool = False) -> Reducer:
    """dedicated: on process groups of its own (for a background thread); hierarchical
    reducers always create their own groups."""
    if not hierarchical:
        return FlatReducer(dedicated_group(ctx) if dedicated else ctx.dp_mesh.get_group(), codec, block, error_feedback)
    h = build_hierarchy(data_parallel_groups(ctx.mesh), node_ids(ctx.world_size, node_size), ctx.rank)
    return HierarchicalReducer(h.intra, FlatReducer(h.inter, codec, block, error_feedback))


def _ddp_hook(ddp_modules, c, group, counter: ByteCounter, parts: dict) -> str:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as psgd

    n = dist.get_world_size(group)
    if c.grad in ("bf16", "fp16"):
        inner = default_hooks.bf16_compress_hook if c.grad == "bf16" else default_hooks.fp16_compress_hook

        def hook(state, bucket):
            counter.sent += ring_allreduce_bytes(bucket.buffer().numel() * 2, n)
            return inner(state, bucket)

        for m in ddp_modules:
            m.register_comm_hook(group, hook)
        return f"torch DDP {inner.__name__}"

    # torch's hook chains its P and Q all-reduces as future callbacks. gloo completes futures
    # on its own threads, so two buckets' chains can post collectives in different orders on
    # different ranks (a mismatch gloo aborts on); finishing each bucket before the next
    # keeps the order. Device backends run the callbacks in stream order and need no wait.
    serialize = dist.get_backend(group) == "gloo"
    states = PowerSGDHookStates()
    for m in ddp_modules:
        # torch needs >= 2 plain iterations first: DDP rebuilds its buckets after the first.
        state = psgd.PowerSGDState(process_group=group, matrix_approximation_rank=c.powersgd_rank,
                                   start_powerSGD_iter=max(2, c.powersgd_warmup_steps),
                                   use_error_feedback=c.error_feedback, warm_start=True, random_seed=0)

        def hook(tracked, bucket):
            state = tracked.state
            compressed = state.iter >= state.start_powerSGD_iter
            if compressed:
                tracked.before(bucket)
            before = state.total_numel_after_compression
            fut = psgd.powerSGD_hook(state, bucket)
            numel = state.total_numel_after_compression - before if compressed else bucket.buffer().numel()
            counter.sent += ring_allreduce_bytes(numel * bucket.buffer().element_size(), n)
            if serialize:
                fut.wait()
            return fut

        m.register_comm_hook(states.add(m, state), hook)
    parts["powersgd_ddp"] = states
    return "torch DDP powerSGD_hook"


def attach_comm_options(trainer) -> CommOptions:
    """Build the job's CommOptions. Call once, after parallelize() and after restoring any
    checkpoint (DiLoCo continues its schedule from trainer.step), before the next step.

    Reads from `trainer`: cfg (JobConfig; [comm] and train.seed), ctx (ParallelContext),
    pmodel (ParallelModel), params (this rank's parameters, the list the optimizer holds)
    and model_cfg (ModelConfig). Registers DDP comm hooks, FSDP reduce-scatters or pipeline hooks as needed.
    """
    c, ctx, pmodel = trainer.cfg.comm, trainer.ctx, trainer.pmodel
    params = [p for p in trainer.params if p.requires_grad]
    kind = pmodel.data_parallel
    opts = CommOptions()
    opts.details = {"grad": c.grad, "data_parallel": kind, "dp": ctx.dp_size}
    diloco = c.diloco_inner_steps > 0

    if c.pp_compress != "none":
        if pmodel.pipeline is None:
            raise ValueError(f"comm.pp_compress: '{c.pp_compress}' compresses pipeline stage boundaries, but "
                             f"parallel.pp = 1; set parallel.pp > 1 or comm.pp_compress = \"none\"")
        opts.pipeline = compress_pipeline(pmodel.pipeline, c.pp_compress, trainer.model_cfg.dim,
                                          c.pp_compress_boundaries)
        opts.details["pp_compress"] = c.pp_compress

    if ctx.dp_size == 1:
        opts.describe_path = "single replica: no gradient sync"
        return _bound(trainer, opts)

    group = ctx.dp_mesh.get_group()
    n = ctx.dp_size
    if kind in ("fsdp", "hsdp"):
        if diloco or c.grad == "powersgd" or c.hierarchical:
            what = ("comm.diloco_inner_steps" if diloco else "comm.hierarchical" if c.hierarchical
                    else "comm.grad = \"powersgd\"")
            raise ValueError(f"{what}: needs whole gradients on every replica, i.e. replicated data parallel (DDP): "
                             f"set parallel.dp_replicate = {n} and parallel.dp_shard = 1 with tp = pp = 1; under "
                             f"FSDP/HSDP only comm.grad = fp32, bf16, fp16, int8 or fp8 apply (to the reduce-scatter)")
        p = ctx.parallel
        local = sum(_local_numel(q) for q in params)
        replicate = (lambda: ring_allreduce_bytes(local * 4, p.dp_replicate)) if kind == "hsdp" else (lambda: 0)
        if c.grad == "fp32":
            opts.estimate = lambda: ring_half_bytes(local * p.dp_shard * 4, p.dp_shard) + replicate()
            opts.describe_path = f"torch FSDP reduce-scatter ({kind}, fp32)"
        else:
            from suanli.infra.lowbw.fsdp import install

            install(pmodel.modules, c.grad, c.quant_block, c.error_feedback, opts.counter)
            opts.estimate = replicate
            opts.describe_path = f"compressed FSDP reduce-scatter ({c.grad})" + (
                "; HSDP replicate all-reduce stays torch fp32" if kind == "hsdp" else "")
        return _bound(trainer, opts)

    if kind not in ("ddp", "none"):
        raise ValueError(f"comm: unknown data-parallel kind {kind!r}")

    if diloco:
        from suanli.infra.lowbw.diloco import DiLoCo

        tau = c.diloco_overlap_steps
        reducer = make_reducer(ctx, c.diloco_compress, c.quant_block, c.error_feedback, c.hierarchical, c.node_size,
                               dedicated=tau > 0)
        # Warm-up steps average gradients with the same codec (and topology) as the outer step,
        # on the loop's own groups when the outer step runs in the background.
        warmup = reducer if tau == 0 or not c.diloco_warmup_steps else make_reducer(
            ctx, c.diloco_compress, c.quant_block, c.error_feedback, c.hierarchical, c.node_size)
        outer = DiLoCo(params, reducer, c.diloco_inner_steps, c.diloco_outer_lr, c.diloco_outer_momentum,
                       c.diloco_streaming_fragments, c.diloco_warmup_steps, warmup,
                       start_step=int(getattr(trainer, "step", 0)), overlap_steps=tau, mix=c.diloco_overlap_mix,
                       inner_optimizer=getattr(trainer, "optimizer", None))
        opts.skip_builtin_sync = True
        opts.sync = lambda ps: outer.after_backward(_grads(ps))
        opts.outer = outer.after_optimizer_step
        opts.describe_path = (f"suanli DiLoCo H={c.diloco_inner_steps} outer lr {c.diloco_outer_lr} momentum "
                              f"{c.diloco_outer_momentum}, pseudo-gradient {c.diloco_compress}, "
                              f"{len(outer.fragments)} fragment(s), {c.diloco_warmup_steps} warm-up step(s)"
                              + (f", overlapped {tau} step(s), mix {c.diloco_overlap_mix}" if tau else ""))
        opts.details.update(overlap_steps=tau)
        opts.parts["diloco"] = outer
        return _bound(trainer, opts)

    use_hook = kind == "ddp" and c.ddp_hooks and c.grad in ("bf16", "fp16", "powersgd") and not c.hierarchical
    if kind == "ddp" and c.grad == "fp32" and not c.hierarchical:
        opts.estimate = lambda: ring_allreduce_bytes(sum(q.numel() for q in params) * 4, n)
        opts.describe_path = "torch DDP all-reduce (fp32)"
    elif use_hook:
        opts.describe_path = _ddp_hook(pmodel.modules, c, group, opts.counter, opts.parts)
    elif c.grad == "powersgd":
        from suanli.infra.lowbw.powersgd import PowerSGD

        psgd = PowerSGD(group, c.powersgd_rank, c.powersgd_warmup_steps, c.error_feedback, seed=trainer.cfg.train.seed)
        opts.skip_builtin_sync = True
        opts.sync = lambda ps: psgd.average_(_grads(ps))
        opts.parts["powersgd"] = psgd
        opts.describe_path = f"suanli PowerSGD rank {c.powersgd_rank}"
    else:
        reducer = make_reducer(ctx, c.grad, c.quant_block, c.error_feedback, c.hierarchical, c.node_size)
        opts.skip_builtin_sync = True
        opts.sync = lambda ps: average_tensors_(reducer, _grads(ps))
        opts.describe_path = f"suanli {'hierarchical' if c.hierarchical else 'flat'} all-reduce ({c.grad})"
        opts.parts["reducer"] = reducer
    return _bound(trainer, opts)


def _bound(trainer, opts: CommOptions) -> CommOptions:
    """Hand the options to the trainer's checkpoint slot (which applies a resumed state),
    and stop DiLoCo's background worker when the trainer's fit ends."""
    slot = getattr(trainer, "comm_checkpoint", None)
    if slot is not None:
        slot.bind(opts)
    hooks = getattr(trainer, "hooks", None)
    if hooks is not None:
        hooks.on_fit_end.append(lambda _trainer: opts.close())
    return opts
