"""Pipeline parallel on `torch.distributed.pipelining`: stage splits and schedules.

A split says how many transformer layers each stage holds: uniform, an explicit list (the
uneven split Yuan 2.0 uses to cut first-stage memory), or "auto", which balances compute
counting the embedding and the output head as layers of their own cost. A stage is the
full model with the other stages' layers deleted, so parameter names (and so checkpoints)
do not depend on the split.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                                    ScheduleZBVZeroBubble)

from suanli.infra.model import ModelConfig

# name -> (schedule class, stages per rank: None = from config, fixed int otherwise)
SCHEDULES: dict[str, tuple[type, int | None]] = {
    "gpipe": (ScheduleGPipe, 1),
    "1f1b": (Schedule1F1B, 1),
    "interleaved-1f1b": (ScheduleInterleaved1F1B, None),
    "zbv": (ScheduleZBVZeroBubble, 2),
}


def stages_per_rank(schedule: str, configured: int) -> int:
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule: '{schedule}' is not one of {sorted(SCHEDULES)}")
    fixed = SCHEDULES[schedule][1]
    if fixed is None and configured < 2:
        raise ValueError(f"parallel.pp_stages_per_rank: interleaved-1f1b needs at least 2 stages per rank, got {configured}")
    return fixed or configured


def stage_ids_for_rank(pp_rank: int, pp: int, schedule: str, per_rank: int) -> list[int]:
    """Which global stages a pipeline rank runs. Looped (interleaved) schedules give rank r
    stages r, r+pp, ...; the V schedule gives r and 2pp-1-r so the last stage sits next to
    the first (its loss starts the backward on the same rank that did the first forward)."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[float, float, float]:
    """Relative forward cost of (embedding, one transformer layer, norm + output head) per token,
    from the matmul FLOPs (the embedding is a lookup: charged like a small layer fraction for
    its memory traffic)."""
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * cfg.ffn_dim) + 4 * seq_len * d
    head = 2 * d * cfg.vocab_size
    embedding = 0.05 * layer
    return embedding, float(layer), float(head)


def split_layers(n_layers: int, n_stages: int, spec: list[int] | str, costs: tuple[float, float, float] | None = None
                 ) -> list[int]:
    """Layers per stage. Never drops or invents a layer: a bad split is an error."""
    if n_stages > n_layers:
        raise ValueError(f"parallel.pp: {n_stages} pipeline stages but model.n_layers={n_layers}; "
                         f"every stage needs at least one layer")
    if spec == "auto":
        if costs is None:
            raise ValueError("parallel.pp_layers: 'auto' needs the layer costs")
        return balanced_layers(n_layers, [1.0] * n_stages, costs)
    if not spec:
        base, extra = divmod(n_layers, n_stages)
        # The extra layers go to the middle stages: the first holds the embedding and the
        # last the output head, so they are already the heavier ones.
        order = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), s))
        counts = [base] * n_stages
        for s in order[:extra]:
            counts[s] += 1
        return counts
    if len(spec) != n_stages:
        raise ValueError(f"parallel.pp_layers: {spec} has {len(spec)} entries but there are {n_stages} pipeline "
                         f"stages (pp x stages per rank)")
    if any(c < 1 for c in spec):
        raise ValueError(f"parallel.pp_layers: {spec} has an empty stage; every stage needs at least one layer")
    if sum(spec) != n_layers:
        raise ValueError(f"parallel.pp_layers: {spec} sums to {sum(spec)} but model.n_layers={n_layers}")
    return list(spec)


def stage_work(stage: int, n_stages: int, layers: int, costs: tuple[float, float, float]) -> float:
    """Forward work of a stage in units of one transformer layer (embedding on the first
    stage, norm + head on the last)."""
    emb, layer, head = costs
    return layers + (emb / layer if stage == 0 else 0.0) + (head / layer if stage == n_stages - 1 else 0.0)


def balanced_layers(n_layers: int, capacities: list[float], costs: tuple[float, float, float]) -> list[int]:
    """Contiguous split of `n_layers` over stages minimising the slowest stage's
    work / capacity (equal capacities for one device type; the heterogeneous balancer passes
    each stage's measured speed). An exact dynamic programme: at most a few hundred layers by
    a few dozen stages."""
    n = len(capacities)
    inf = float("inf")
    # best[s][i]: the smallest achievable slowest-stage time placing layers i.. on stages s..
    best = [[inf] * (n_layers + 1) for _ in range(n + 1)]
    choice = [[0] * (n_layers + 1) for _ in range(n + 1)]
    best[n][n_layers] = 0.0
    for s in range(n - 1, -1, -1):
        for i in range(n_layers - 1, -1, -1):
            for k in range(1, n_layers - i - (n - s - 1) + 1):
                v = max(stage_work(s, n, k, costs) / capacities[s], best[s + 1][i + k])
                if v < best[s][i] - 1e-12:
                    best[s][i], choice[s][i] = v, k
    counts, i = [], 0
    for s in range(n):
        counts.append(choice[s][i])
        i += choice[s][i]
    return counts


def build_stage_module(model: nn.Module, stage: int, n_stages: int, counts: list[int]) -> nn.Module:
    """A copy of `model` holding only `stage`'s layers (plus the embedding on the first stage
    and the final norm and head on the last)."""
    if getattr(model.cfg, "tie_embeddings", False) and n_stages > 1:
        raise ValueError("model.tie_embeddings: tied input/output embeddings cannot be split across pipeline "
                         "stages; set model.tie_embeddings = false or parallel.pp = 1")
    start = sum(counts[:stage])
    keep = {str(i) for i in range(start, start + counts[stage])}
    stage_model = copy.deepcopy(model)
    for name in list(stage_model.layers.keys()):
        if name not in keep:
            del stage_model.layers[name]
    if stage != 0:
        stage_model.tok_embeddings = None
    if stage != n_stages - 1:
        stage_model.norm = None
        stage_model.output = None
    return stage_model


@dataclass
class Pipeline:
    schedule: object                 # a torch pipelining schedule
    stages: list[PipelineStage]
    modules: list[nn.Module]         # this rank's stage modules, in stage order
    has_first: bool
    has_last: bool
    counts: list[int]                # layers per global stage

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        self.schedule.step(*args, target=targets if self.has_last else None, losses=losses, return_outputs=False)
        return losses


def build_pipeline(modules: list[nn.Module], stage_ids: list[int], n_stages: int, device: torch.device,
                   pp_group, schedule_name: str, n_microbatches: int, loss_fn: Callable, counts: list[int]) -> Pipeline:
    cls, fixed = SCHEDULES[schedule_name]
    stages = [PipelineStage(m, sid, n_stages, device, group=pp_group) for m, sid in zip(modules, stage_ids)]
    pp = n_stages // len(stage_ids)
    if fixed == 1:
        schedule = cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    else:
        if schedule_name == "interleaved-1f1b" and n_microbatches % pp:
            raise ValueError(f"train.micro_batch: interleaved-1f1b needs the number of micro-batches per step "
                             f"({n_microbatches}) to be a multiple of parallel.pp={pp}")
        schedule = cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    return Pipeline(schedule, stages, modules, 0 in stage_ids, (n_stages - 1) in stage_ids, counts)
