"""Optimizer, learning-rate schedule and gradient clipping that is correct under TP/PP/DP.

The gradient norm must be the norm of the *whole* model's gradient: DTensor shards (TP,
FSDP) are reduced by DTensor itself, and pipeline stages hold disjoint parameters, so
their squared norms are summed across the pipeline group.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from suanli.backends import Accelerator


def build_optimizer(acc: Accelerator, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (norm gains and 1-D params are
    not decayed, as in LLaMA and GPT-3 training)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return acc.fused_adamw(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine down to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio))


@torch.no_grad()
def total_grad_norm(params: Iterable[torch.nn.Parameter], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm of all gradients across every parallel dimension (a plain fp32 scalar)."""
    by_layout: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
            by_layout[key].append(g)
    sq = torch.zeros((), dtype=torch.float32)
    for key, grads in by_layout.items():
        norms = torch._foreach_norm(grads, 2.0)
        n = torch.linalg.vector_norm(torch.stack([x.float() for x in norms]), 2.0)
        if isinstance(n, DTensor):  # reduces the shards' partial norms across TP / FSDP ranks
            n = n.full_tensor()
        sq = sq + n.float().cpu() ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
                    ) -> float:
    """Clip in place when max_norm > 0; always return the pre-clip norm (for metrics)."""
    norm = total_grad_norm(params, pp_group)
    if max_norm > 0 and math.isfinite(norm.item()):
        scale = max_norm / (norm.item() + 1e-6)
        if scale < 1.0:
            grads = [p.grad for p in params if p.grad is not None]
            for g in grads:
                g.mul_(scale)
    return float(norm.item())
