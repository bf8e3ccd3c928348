"""`build_hetero(cfg)`: the seam between a [hetero] config and a training loop.

It returns the two objects the Trainer reads, shaped like `ParallelContext` and
`ParallelModel`:

- `HeteroContext`: rank, world_size, accelerator, device, tp_rank, pp_rank, parallel,
  group(...). dp_rank = 0 and dp_size = 1 describe the *data feed*: every rank receives
  the whole global batch (token ids are tiny) and the pipeline takes its replica's rows,
  since replicas of different stages split the batch differently.
- `HeteroModel`: modules, pipeline (.step(inputs, targets) -> losses, .has_first,
  .has_last), parameters(), tensor_parallel, data_parallel, stage_layers, and a
  clip_grad_norm_ that is right for every layout.

Each rank's group membership decides its accelerator: a rank in a "npu" group runs
get_accelerator("npu"), and SUANLI_ACCELERATOR is set to it in this process so the
model's fused kernels come from the same backend.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from suanli.infra.distributed import ParallelConfig
from suanli.infra.hetero.balance import (Prediction, balanced_layers, check_speeds, measure_block_seconds,
                                         replica_speeds, simulate, stage_capacity)
from suanli.infra.hetero.bridge import DeviceLink, HostBridge, make_codec
from suanli.infra.hetero.engine import HeteroPipeline
from suanli.infra.hetero.gradsync import GradSync, global_grad_norm
from suanli.infra.hetero.groups import HeteroGroups, build_groups
from suanli.infra.hetero.layout import DeviceGroup, HeteroPlan, LayoutError, Role, check_layout, resolve_nodes
from suanli.infra.hetero.settings import check_config, check_layers


@dataclass
class HeteroContext:
    plan: HeteroPlan
    role: Role
    groups: HeteroGroups
    accelerator: object
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    parallel: ParallelConfig          # tp of this rank's group; pp = number of stages; dp = 1 (see dp_size)
    speeds: dict[int, float] = field(default_factory=dict)
    prediction: Prediction | None = None
    watchdog_env: dict = field(default_factory=dict)

    dp_rank = 0   # the data feed: every rank reads the global batch (module docstring)
    dp_size = 1

    @property
    def tp_rank(self) -> int:
        return self.role.tp

    @property
    def pp_rank(self) -> int:
        return self.role.stage

    @property
    def mesh(self):
        return self.groups.mesh

    def coord(self, dim: str) -> int:
        return self.groups.mesh.get_local_rank(dim)

    def group(self, dim: str) -> dist.ProcessGroup:
        """"pp": the gloo group over which this rank's stage grad-norm square is summed with
        one rank of every other stage (what infra.optim.clip_grad_norm_ expects). It exists
        only when every stage is held by the same number of ranks; otherwise use
        HeteroModel.clip_grad_norm_. "tp" / "dp" / "stage" / "local": this device group's own."""
        if dim == "pp":
            if self.groups.norm is None:
                counts = [len(self.plan.stage_ranks(s)) for s in range(self.plan.n_stages)]
                raise ValueError(f"hetero: stages are held by different numbers of ranks {counts}, so no group "
                                 f"sums each stage's gradient norm once; call HeteroModel.clip_grad_norm_ instead "
                                 f"of infra.optim.clip_grad_norm_ with ctx.group('pp')")
            return self.groups.norm
        table = {"tp": self.groups.tp, "dp": self.groups.dp, "stage": self.groups.stage, "local": self.groups.local}
        if dim not in table:
            raise KeyError(f"hetero context: no group '{dim}'; known: pp, {', '.join(table)}")
        return table[dim]

    def coordinates(self) -> dict[str, int]:
        return {"group": self.role.group.index, "stage": self.role.stage, "dp": self.role.dp, "tp": self.role.tp}

    def describe(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "accelerator": self.accelerator.name,
                "backend": dist.get_backend(self.groups.local), "device": str(self.device),
                "parallel": asdict(self.parallel), "coordinates": self.coordinates(), "hetero": self.plan.describe()}


@dataclass
class HeteroModel:
    modules: list[nn.Module]
    pipeline: HeteroPipeline
    data_parallel: str               # "none" | "replicate" (gradients summed by GradSync)
    tensor_parallel: bool
    stage_layers: list[int]
    ctx: HeteroContext

    def parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules:
            yield from m.parameters()

    def train(self, mode: bool = True) -> "HeteroModel":
        for m in self.modules:
            m.train(mode)
        return self

    def grad_norm(self) -> float:
        plan, role = self.ctx.plan, self.ctx.role
        return global_grad_norm(list(self.parameters()), len(plan.stage_ranks(role.stage)))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip to `max_norm` (when > 0) by the whole model's norm; return the pre-clip norm."""
        norm = self.grad_norm()
        scale = max_norm / (norm + 1e-6) if max_norm > 0 and math.isfinite(norm) else 1.0
        if scale < 1.0:   # the same rule as infra.optim.clip_grad_norm_
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm


# ---------------------------------------------------------------- building


def _init_world(timeout_s: float) -> tuple[int, int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # gloo only: the world group spans vendors, so it may carry host values only.
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ or world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif dist.get_backend() != "gloo" and "gloo" not in str(dist.get_backend()):
        raise RuntimeError("hetero: the default process group must include gloo (it spans vendors); "
                           "initialise it with backend=\"gloo\" or let build_hetero do it")
    return dist.get_rank(), dist.get_world_size(), local


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _accelerator(me: DeviceGroup, rank: int, local_rank: int):
    """This rank's accelerator from its group's device type; the same clear error on every
    rank when any rank's device is missing (rather than some ranks hanging)."""
    from suanli.backends import ENV_VAR, AcceleratorUnavailable, get_accelerator, reset_selection

    acc, problem = None, None
    try:
        acc = get_accelerator(me.device)
        index = int(os.environ.get("SUANLI_DEVICE_INDEX", local_rank))
        if acc.device_type != "cpu":
            if index >= acc.device_count():
                raise AcceleratorUnavailable(f"device index {index} but only {acc.device_count()} visible")
            acc.set_device(index)
    except (AcceleratorUnavailable, ValueError, RuntimeError) as e:
        problem = f"{me.where}.device: '{me.device}' is not usable on rank {rank} (host {socket.gethostname()}): {e}"
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise LayoutError(problems[0] + "; put that group's ranks on hosts that have this device type"
                          + (f" ({len(problems) - 1} more rank(s) failed the same way)" if len(problems) > 1 else ""))
    os.environ[ENV_VAR] = me.device
    reset_selection()
    device = acc.device(index) if acc.device_type != "cpu" else torch.device("cpu")
    return acc, device


def _replica_speeds(cfg, groups, acc, device, model_cfg, mode: str, tp_mesh) -> tuple[dict, dict | None]:
    """Per group: a replica's speed (rows per unit time; higher = faster) and, when measured,
    seconds of one layer's forward on one row (for the predicted step time). Collective."""
    rank = dist.get_rank()
    me = next(g for g in groups if rank in g.ranks)
    if all(g.speed for g in groups):   # given in the config: nothing to measure or look up
        return replica_speeds(groups, {g.index: g.speed for g in groups}), None
    if mode == "table":
        by_group: dict[int, list] = {}
        for idx, peak in _gather((me.index, acc.peak_flops(cfg.train.dtype))):
            by_group.setdefault(idx, []).append(peak)
        device_speed = check_speeds(groups, {i: min(v) if all(v) else None for i, v in by_group.items()}, mode)
        return replica_speeds(groups, device_speed), None
    # Measured with the group's own tp, one device group at a time: devices that share a
    # host (the emulated ones, or CPU-bound vendor runtimes) would slow each other's timing.
    mb = me.micro_batch or cfg.train.micro_batch
    per_row = None
    for g in groups:
        dist.barrier()
        if g is me:
            seconds = measure_block_seconds(acc, device, model_cfg, cfg.train.seq_len, mb,
                                            tp_mesh if me.tp > 1 else None)
            per_row = seconds / mb
    dist.barrier()
    worst: dict[int, float] = {}
    for idx, value in _gather((me.index, per_row)):
        worst[idx] = max(value, worst.get(idx, 0.0))   # the slowest rank sets a group's pace
    speeds = check_speeds(groups, {i: 1.0 / v for i, v in worst.items()}, mode)
    return speeds, {i: v / 3.0 for i, v in worst.items()}   # forward ≈ a third of forward + backward


def build_hetero(cfg, *, timeout_s: float = 600.0) -> tuple[HeteroContext, HeteroModel]:
    """Start (or join) the job, build this rank's groups, stage module and pipeline."""
    from suanli.backends import apply_watchdog_env
    from suanli.infra.config import model_config
    from suanli.infra.model import Transformer
    from suanli.infra.parallelize import apply_activation_checkpointing
    from suanli.infra.pipeline import build_stage_module, layer_costs, split_layers
    from suanli.infra.tensor_parallel import apply_tp

    h, t = cfg.hetero, cfg.train
    if h.emulated:
        from suanli.backends.emulated import register

        register()
    groups = check_config(cfg)
    model_cfg = model_config(cfg)
    rank, world, local_rank = _init_world(timeout_s)
    if any(g.nodes for g in groups):
        groups = resolve_nodes(groups, _gather(socket.gethostname()))
    n_stages = check_layout(groups, model_cfg.n_layers, world)
    me = next(g for g in groups if rank in g.ranks)
    acc, device = _accelerator(me, rank, local_rank)
    applied = apply_watchdog_env(acc, os.environ, timeout_s)

    # The groups depend on the device groups and stages only, not on the split: build them
    # first, so speeds can be measured with each group's real tensor parallel.
    uniform = split_layers(model_cfg.n_layers, n_stages, [])
    plan = HeteroPlan(groups, n_stages, uniform, t.global_batch, t.seq_len, {}, t.micro_batch)
    hgroups = build_groups(plan, rank, acc.device_type, acc.comm_backend, datetime.timedelta(seconds=timeout_s))

    costs = layer_costs(model_cfg, t.seq_len)
    speeds, row_fwd = replica_speeds(groups, {g.index: 1.0 for g in groups}), None
    if h.balance != "none":
        speeds, row_fwd = _replica_speeds(cfg, groups, acc, device, model_cfg, h.balance, hgroups.mesh["tp"])
    layers = check_layers(h.layers, n_stages, model_cfg.n_layers)
    if not layers:
        layers = (uniform if h.balance == "none" else
                  balanced_layers(model_cfg.n_layers, [stage_capacity(groups, s, speeds) for s in range(n_stages)],
                                  costs))
    plan = HeteroPlan(groups, n_stages, layers, t.global_batch, t.seq_len,
                      speeds if h.balance != "none" else {}, t.micro_batch)
    hgroups.plan = plan
    role = plan.role(rank)
    prediction = simulate(plan, row_fwd or {g.index: 1.0 / speeds[g.index] for g in groups}, costs,
                          unit="s" if row_fwd else "relative")

    # Every rank builds the same full model from the same seed (as the Trainer does), then
    # keeps its stage: parameter names stay the full model's, so checkpoints are layout-free.
    torch.manual_seed(t.seed)
    model = Transformer(model_cfg).to(device)
    module = build_stage_module(model, role.stage, n_stages, layers) if n_stages > 1 else model
    if me.tp > 1:
        apply_tp(module, hgroups.mesh["tp"])
    apply_activation_checkpointing(module, cfg.parallel.activation_checkpoint)

    codec = make_codec(h.bridge_compress)
    device_link = DeviceLink(hgroups.local, device)
    bridges = {b: HostBridge(pg, device, codec) for b, pg in hgroups.bridges_pp.items()}
    links = {}
    for b in (role.stage - 1, role.stage):
        if 0 <= b < n_stages - 1:
            for m in plan.boundary(b):
                if rank in (m.src, m.dst):
                    peer = m.dst if m.src == rank else m.src
                    links[peer] = device_link if peer in me.ranks else bridges[b]
    params = list(module.parameters())
    grad_sync = GradSync(params, hgroups, leader=role.dp == 0 and role.tp == 0, dp_size=me.dp, device=device,
                         codec={"none": "fp32"}.get(h.bridge_compress, h.bridge_compress))
    pipeline = HeteroPipeline(plan, role, module, links, grad_sync, acc, device, model_cfg.dim,
                              act_dtype=next(iter(model.parameters())).dtype)
    ctx = HeteroContext(plan, role, hgroups, acc, device, rank, local_rank, world,
                        ParallelConfig(tp=me.tp, pp=n_stages, dp_replicate=1, dp_shard=1), speeds, prediction, applied)
    dp_kind = "replicate" if any(len(plan.replicas[s]) > 1 for s in range(n_stages)) else "none"
    return ctx, HeteroModel([module], pipeline, dp_kind, me.tp > 1, list(layers), ctx)


__all__ = ["HeteroContext", "HeteroModel", "build_hetero"]
