"""Distributed init: one process group on the HAL's collective backend and one named
DeviceMesh ("pp", "dp_replicate", "dp_shard", "tp") built from a single shape.

Every parallelism in suanli takes its process groups from this mesh, so the layout is
decided in exactly one place. tp is the innermost dimension: consecutive ranks (the same
node under torchrun / the Ray supervisor) share tensor-parallel traffic, the heaviest.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from suanli.backends import Accelerator, apply_watchdog_env, get_accelerator

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1   # -1: whatever is left of the world size

    def resolve(self, world_size: int) -> "ParallelConfig":
        """Fill dp_shard=-1 and check the degrees multiply to the world size."""
        for name in ("tp", "pp", "dp_replicate"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name}: must be an integer >= 1, got {v!r}")
        fixed = self.tp * self.pp * self.dp_replicate
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ValueError(
                    f"parallel: tp*pp*dp_replicate = {self.tp}*{self.pp}*{self.dp_replicate} = {fixed} does not divide "
                    f"the world size {world_size}; {_fits(world_size)}")
            dp_shard = world_size // fixed
        if not isinstance(dp_shard, int) or dp_shard < 1:
            raise ValueError(f"parallel.dp_shard: must be an integer >= 1 or -1, got {self.dp_shard!r}")
        if fixed * dp_shard != world_size:
            raise ValueError(
                f"parallel: tp*pp*dp_replicate*dp_shard = {self.tp}*{self.pp}*{self.dp_replicate}*{dp_shard} = "
                f"{fixed * dp_shard} but the world size is {world_size}; {_fits(world_size)}")
        return ParallelConfig(self.tp, self.pp, self.dp_replicate, dp_shard)

    @property
    def dp(self) -> int:
        return self.dp_replicate * max(self.dp_shard, 1)

    def shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)


def _fits(world_size: int) -> str:
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    return (f"degrees that fit {world_size} processes are products of {divisors} "
            f"(e.g. tp={divisors[min(1, len(divisors) - 1)]}, dp_shard=-1)")


@dataclass
class ParallelContext:
    """What a training process knows about its place in the job."""

    parallel: ParallelConfig
    mesh: DeviceMesh
    accelerator: Accelerator
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    watchdog_env: dict = field(default_factory=dict)

    # coordinates on each named mesh dimension
    def coord(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    @property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @property
    def dp_rank(self) -> int:
        """Rank among all data-parallel replicas (dp_replicate × dp_shard flattened)."""
        return self.coord("dp_replicate") * self.parallel.dp_shard + self.coord("dp_shard")

    @property
    def dp_size(self) -> int:
        return self.parallel.dp

    def sub_mesh(self, *dims: str) -> DeviceMesh:
        return self.mesh[dims if len(dims) > 1 else dims[0]]

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The flattened data-parallel mesh (for loss averaging and data sharding)."""
        return self._flat("dp_replicate", "dp_shard", "dp")

    def _flat(self, a: str, b: str, name: str) -> DeviceMesh:
        try:
            return self.mesh[name]
        except (KeyError, RuntimeError, ValueError):
            return self.mesh[(a, b)]._flatten(name)

    def coordinates(self) -> dict[str, int]:
        return {d: self.coord(d) for d in MESH_DIMS}

    def describe(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "accelerator": self.accelerator.name,
                "backend": dist.get_backend(), "device": str(self.device), "parallel": asdict(self.parallel),
                "coordinates": self.coordinates()}


def build_mesh(device_type: str, parallel: ParallelConfig) -> DeviceMesh:
    """The one mesh every process group is cut from."""
    return init_device_mesh(device_type, parallel.shape(), mesh_dim_names=MESH_DIMS)


def _backend_string(acc: Accelerator) -> str:
    # Keep gloo for CPU tensors beside the device backend: metrics, barriers and the
    # host-staged bridge then work on any vendor without a second init.
    comm = acc.comm_backend
    return comm if acc.device_type == "cpu" else f"cpu:gloo,{acc.device_type}:{comm}"


def init(parallel: ParallelConfig | None = None, timeout_s: float = 600.0,
         accelerator: Accelerator | str | None = None) -> ParallelContext:
    """Start (or join) the process group from torchrun-style env vars and build the mesh.

    Without RANK/WORLD_SIZE in the environment this is a one-process job, which is how
    scripts run on a laptop.
    """
    parallel = parallel or ParallelConfig()
    acc = accelerator if isinstance(accelerator, Accelerator) else get_accelerator(accelerator)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = parallel.resolve(world_size)

    applied = apply_watchdog_env(acc, os.environ, timeout_s)
    # torchrun shows every device and LOCAL_RANK picks one; a scheduler that narrows
    # visibility to one device per process (the Ray supervisor) says so with SUANLI_DEVICE_INDEX.
    index = int(os.environ.get("SUANLI_DEVICE_INDEX", local_rank))
    if acc.device_type != "cpu":
        n = acc.device_count()
        if index >= n:
            raise RuntimeError(
                f"device index {index} (LOCAL_RANK / SUANLI_DEVICE_INDEX) but only {n} {acc.name} device(s) are "
                f"visible; start at most {n} processes per node or check {acc.visible_devices_env}")
        acc.set_device(index)
    device = acc.device(index) if acc.device_type != "cpu" else torch.device("cpu")

    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ or world_size > 1:
            dist.init_process_group(backend=_backend_string(acc), rank=rank, world_size=world_size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=_backend_string(acc), store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    mesh = build_mesh(acc.device_type, resolved)
    return ParallelContext(resolved, mesh, acc, device, rank, local_rank, world_size, applied)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["ParallelConfig", "ParallelContext", "init", "shutdown", "build_mesh", "MESH_DIMS"]
