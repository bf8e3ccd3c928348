"""A minimal training loop that drives CommOptions through exactly the seam the trainer
offers (options.py). Tests and `suanli bench lowbw` use it so the options can be measured
on their own; it builds the model, data and optimizer with the same helpers as the trainer
(infra.trainer.Trainer), so a run here and a Trainer run with the same config see the same
weights, batches and learning rates.

`optimizer="sgd"` (plain SGD, no momentum or weight decay) exists for the DiLoCo
equivalence test: DiLoCo with H=1 equals data parallel only for a linear inner optimizer.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from suanli.infra.config import JobConfig, model_config
from suanli.infra.data import DistributedBatchSampler, TokenDataset, make_batch, split_microbatches, synthetic_tokens
from suanli.infra.distributed import ParallelConfig, ParallelContext, init
from suanli.infra.lowbw.options import CommOptions, attach_comm_options
from suanli.infra.model import Transformer, cross_entropy_loss
from suanli.infra.optim import build_lr_scheduler, build_optimizer, clip_grad_norm_
from suanli.infra.parallelize import ParallelModel, parallelize


@dataclass
class Run:
    """The trainer-shaped object attach_comm_options reads (cfg, ctx, pmodel, params)."""

    cfg: JobConfig
    ctx: ParallelContext
    pmodel: ParallelModel
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    model_cfg: object
    n_micro: int
    sampler: DistributedBatchSampler
    dataset: TokenDataset
    comm: CommOptions | None = None


def build(cfg: JobConfig, ctx: ParallelContext | None = None, optimizer: str = "adamw") -> Run:
    t, p = cfg.train, cfg.parallel
    ctx = ctx or init(ParallelConfig(p.tp, p.pp, p.dp_replicate, p.dp_shard))
    mcfg = model_config(cfg)
    local_batch = t.global_batch // ctx.dp_size
    n_micro = local_batch // t.micro_batch
    torch.manual_seed(t.seed)
    model = Transformer(mcfg).to(ctx.device)
    pmodel = parallelize(model, ctx, seq_len=t.seq_len, n_microbatches=n_micro, pp_schedule=p.pp_schedule,
                         pp_layers=p.pp_layers, pp_stages_per_rank=p.pp_stages_per_rank,
                         activation_checkpoint=p.activation_checkpoint)
    for m in pmodel.modules:
        # The model's only buffers (RoPE tables) are rebuilt from the config on every rank;
        # DDP's default re-broadcast of them each forward is pure overhead on a slow link.
        if hasattr(m, "broadcast_buffers"):
            m.broadcast_buffers = False
    params = list(pmodel.parameters())
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr)
    else:
        opt = build_optimizer(ctx.accelerator, params, t.lr, t.weight_decay)
    sched = build_lr_scheduler(opt, t.warmup_steps, t.steps, t.min_lr_ratio)
    tokens = (synthetic_tokens(cfg.data.synthetic_tokens, mcfg.vocab_size, t.seed) if cfg.data.synthetic
              else cfg.data.path)
    dataset = TokenDataset(tokens, t.seq_len, vocab_size=mcfg.vocab_size)
    sampler = DistributedBatchSampler(len(dataset), t.global_batch, ctx.dp_rank, ctx.dp_size, seed=t.seed)
    run = Run(cfg, ctx, pmodel, params, opt, sched, mcfg, n_micro, sampler, dataset)
    run.comm = attach_comm_options(run)
    return run


def _no_sync(run: Run, model, last: bool):
    """The trainer's rule, plus the seam: with skip_builtin_sync nothing syncs, ever."""
    sync = last and not run.comm.skip_builtin_sync
    if run.pmodel.data_parallel == "ddp":
        return contextlib.nullcontext() if sync else model.no_sync()
    if run.pmodel.data_parallel in ("fsdp", "hsdp"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def train_step(run: Run, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    pm, ctx = run.pmodel, run.ctx
    # Vocab-sharded logits under tensor parallel need loss_parallel (as the trainer does).
    tp_loss = loss_parallel if pm.tensor_parallel else contextlib.nullcontext
    local_loss = torch.zeros(())
    t0 = time.perf_counter()
    if pm.pipeline is not None:
        with tp_loss():
            losses = pm.pipeline.step(inputs, targets)
        if pm.pipeline.has_last:
            local_loss = torch.stack([_plain(l.detach()).float() for l in losses]).mean().cpu()
    else:
        model = pm.modules[0]
        for i, (x, y) in enumerate(split_microbatches(inputs, targets, run.cfg.train.micro_batch)):
            with _no_sync(run, model, i == run.n_micro - 1), tp_loss():
                loss = cross_entropy_loss(model(x), y) / run.n_micro
                loss.backward()
            local_loss += _plain(loss.detach()).float().cpu()
    t1 = time.perf_counter()
    comm_bytes = run.comm.after_backward(run.params)
    t2 = time.perf_counter()
    grad_norm = clip_grad_norm_(run.params, run.cfg.train.grad_clip, ctx.group("pp") if ctx.parallel.pp > 1 else None)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    comm_bytes += run.comm.after_optimizer_step(step, run.params)
    t4 = time.perf_counter()
    holds = (pm.pipeline.has_last if pm.pipeline is not None else True) and ctx.tp_rank == 0
    t = (local_loss if holds else torch.zeros(())).reshape(1).float()
    if ctx.world_size > 1:
        dist.all_reduce(t)
    # Phase times (this rank's view, no device sync: CPU timing): forward/backward (with DDP's
    # or FSDP's own overlapped sync), after_backward, clip + optimizer, after_optimizer_step
    # (DiLoCo's outer step, or the wait for an overlapped one), the loss all-reduce.
    loss = t.item() / ctx.dp_size
    return {"loss": loss, "grad_norm": grad_norm, "comm_bytes": comm_bytes,
            "fwd_bwd_s": t1 - t0, "sync_s": t2 - t1, "optimizer_s": t3 - t2, "outer_s": t4 - t3,
            "loss_sync_s": time.perf_counter() - t4}


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def train(run: Run, metrics_path: str | Path | None = None) -> list[dict]:
    """Run cfg.train.steps steps; rank 0 appends one JSON line per step to `metrics_path`."""
    out = open(metrics_path, "a") if metrics_path and run.ctx.rank == 0 else None
    records, start = [], time.perf_counter()
    run.pmodel.train()
    try:
        for step in range(1, run.cfg.train.steps + 1):
            inputs, targets = make_batch(run.dataset, next(run.sampler))
            t0 = time.perf_counter()
            rec = train_step(run, step, inputs.to(run.ctx.device), targets.to(run.ctx.device))
            now = time.perf_counter()
            rec.update(step=step, step_time_s=now - t0, wall_s=now - start)
            records.append(rec)
            if out is not None:
                out.write(json.dumps(rec) + "\n")
                out.flush()
    finally:
        if out is not None:
            out.close()
    return records
