"""`parallelize(model, ctx)`: compose torch-native parallelism in a fixed order.

1. pipeline split (each rank keeps its stages' layers),
2. tensor + sequence parallel (DTensor plans, tensor_parallel.py),
3. activation checkpointing,
4. data parallel: FSDP2 `fully_shard` over dp_shard (HSDP when dp_replicate > 1 too),
   or DDP when the job is replicated data parallel only.
The order matters: TP must see plain modules, checkpoint wrappers must sit inside FSDP
units, and FSDP must shard the already tensor-parallel DTensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from suanli.infra.distributed import ParallelContext
from suanli.infra.model import cross_entropy_loss
from suanli.infra.optim import clip_grad_norm_
from suanli.infra.pipeline import (Pipeline, build_pipeline, build_stage_module, layer_costs, split_layers,
                                   stage_ids_for_rank, stages_per_rank)
from suanli.infra.tensor_parallel import apply_tp, check_tp_degree


@dataclass
class ParallelModel:
    """What parallelize() returns: this rank's model parts and how to run them."""

    modules: list[nn.Module]          # one module without PP, this rank's stages with PP
    pipeline: Pipeline | None
    data_parallel: str                # "none" | "fsdp" | "hsdp" | "ddp"
    tensor_parallel: bool
    stage_layers: list[int] = field(default_factory=list)
    pp_group: object = None           # stages hold disjoint parameters: norms add up across it

    def parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules:
            yield from m.parameters()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the whole model's gradient norm (all shards and stages); return it."""
        return clip_grad_norm_(list(self.parameters()), max_norm, self.pp_group)

    def train(self, mode: bool = True) -> "ParallelModel":
        for m in self.modules:
            m.train(mode)
        return self


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """full: recompute whole blocks in backward. selective: keep matmul and attention
    outputs, recompute only the cheap elementwise ops (norms, RoPE, SiLU) — most of the
    memory saving of full recompute at a fraction of its FLOPs."""
    if mode == "none":
        return
    if mode == "full":
        wrap = lambda block: checkpoint_wrapper(block, preserve_rng_state=False)  # noqa: E731
    elif mode == "selective":
        from functools import partial

        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        keep = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
                torch.ops.aten._scaled_dot_product_flash_attention.default,
                torch.ops.aten._scaled_dot_product_efficient_attention.default,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

        def policy(ctx, op, *args, **kwargs):
            return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

        wrap = lambda block: checkpoint_wrapper(  # noqa: E731
            block, context_fn=partial(create_selective_checkpoint_contexts, policy), preserve_rng_state=False)
    else:
        raise ValueError(f"parallel.activation_checkpoint: '{mode}' is not one of none, full, selective")
    for name in list(model.layers.keys()):
        model.layers[name] = wrap(model.layers[name])


def data_parallel_kind(ctx: ParallelContext) -> str:
    p = ctx.parallel
    if p.dp == 1:
        return "none"
    if p.dp_shard == 1 and p.tp == 1 and p.pp == 1:
        return "ddp"
    return "hsdp" if p.dp_replicate > 1 else "fsdp"


def apply_fsdp(model: nn.Module, ctx: ParallelContext, dtype: torch.dtype, reshard_after_forward: bool) -> None:
    p = ctx.parallel
    mesh = ctx.mesh["dp_shard"] if p.dp_replicate == 1 else ctx.mesh[("dp_replicate", "dp_shard")]
    # Compute in `dtype`, but reduce gradients and keep master weights in fp32.
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def parallelize(model: nn.Module, ctx: ParallelContext, *, seq_len: int, n_microbatches: int = 1,
                pp_schedule: str = "1f1b", pp_layers: list[int] | str = (), pp_stages_per_rank: int = 2,
                activation_checkpoint: str = "none", dtype: torch.dtype = torch.float32,
                loss_fn: Callable = cross_entropy_loss) -> ParallelModel:
    """Shard `model` (a full Transformer with weights already initialised identically on every
    rank) for the layout in `ctx`. Returns this rank's parts."""
    p = ctx.parallel
    check_tp_degree(model.cfg, p.tp)

    if p.pp > 1:
        per_rank = stages_per_rank(pp_schedule, pp_stages_per_rank)
        n_stages = p.pp * per_rank
        counts = split_layers(model.cfg.n_layers, n_stages, list(pp_layers) if pp_layers != "auto" else "auto",
                              layer_costs(model.cfg, seq_len))
        stage_ids = stage_ids_for_rank(ctx.pp_rank, p.pp, pp_schedule, per_rank)
        modules = [build_stage_module(model, s, n_stages, counts) for s in stage_ids]
    else:
        if pp_layers and pp_layers != "auto" and list(pp_layers) != [model.cfg.n_layers]:
            raise ValueError(f"parallel.pp_layers: {list(pp_layers)} given but parallel.pp = 1")
        counts, stage_ids, n_stages, modules = [model.cfg.n_layers], [0], 1, [model]

    dp_kind = data_parallel_kind(ctx)
    for i, m in enumerate(modules):
        if p.tp > 1:
            apply_tp(m, ctx.mesh["tp"])
        apply_activation_checkpointing(m, activation_checkpoint)
        if dp_kind in ("fsdp", "hsdp"):
            # With PP a stage runs forward once per micro-batch: keeping its parameters
            # gathered between them saves an all-gather per micro-batch.
            apply_fsdp(m, ctx, dtype, reshard_after_forward=p.pp == 1)
        elif dp_kind == "ddp":
            modules[i] = DistributedDataParallel(m, process_group=ctx.dp_mesh.get_group())

    pipeline = None
    if p.pp > 1:
        pipeline = build_pipeline(modules, stage_ids, n_stages, ctx.device, ctx.group("pp"), pp_schedule,
                                  n_microbatches, loss_fn, counts)
    return ParallelModel(modules, pipeline, dp_kind, p.tp > 1, counts, ctx.group("pp") if p.pp > 1 else None)


def uses_fsdp(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)
