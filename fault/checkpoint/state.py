"""What one rank puts into a checkpoint and takes back out.

Tensors (model and optimizer) go through DCP with FQN keys from
`torch.distributed.checkpoint.state_dict.get_state_dict`, which unwraps FSDP2 / TP / DDP and
flattens the optimizer state per parameter (`flatten_optimizer_state_dict`): every key
names one parameter, so a checkpoint written by one (tp, pp, dp) layout loads into any
other — DCP reshards DTensors, and pipeline stages simply own disjoint keys. The small
state (data sampler, LR schedule, guard, RNG) is JSON.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class TrainState:
    """The live objects a checkpoint saves from and loads into, on one rank.

    modules: this rank's model parts (one module, or its pipeline stages; wrapped or not).
    stateful: name -> object with `state_dict()` / `load_state_dict()` whose state is
      JSON-serialisable and the same on every rank (LR scheduler, data sampler, guard).
    meta: JSON facts saved beside them (config, parallel layout); informational on load.
    accelerator: the HAL accelerator, for the device RNG (None: CPU only).
    per_rank: name -> object with `state_dict()` / `load_state_dict()` whose state differs
      per rank and may hold tensors (the comm options' error-feedback residuals and DiLoCo
      replicas): one torch file per rank, restored only in the same layout, like the RNG.
    """

    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer | None = None
    stateful: dict[str, Any] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    accelerator: Any = None
    per_rank: dict[str, Any] = field(default_factory=dict)


def model_view(modules: list[nn.Module]) -> nn.Module:
    """One module whose parameter names are the model's canonical FQNs.

    With one part that is the part itself. A rank running several pipeline stages holds
    several copies of the model with disjoint pieces (layers keyed by global index), so
    their children are merged into a plain container — the same parameter objects under
    the same names, which is what lets one optimizer's state be keyed by FQN.
    """
    if len(modules) == 1:
        return modules[0]
    view = nn.Module()
    for m in modules:
        m = m.module if isinstance(m, DistributedDataParallel) else m
        for name, child in m.named_children():
            have = view._modules.get(name)
            if have is None:
                view.add_module(name, nn.ModuleDict(dict(child.items())) if isinstance(child, nn.ModuleDict) else child)
            elif isinstance(have, nn.ModuleDict) and isinstance(child, nn.ModuleDict):
                for key, sub in child.items():
                    if key in have and have[key] is not sub:
                        raise ValueError(f"pipeline stages both hold {name}.{key}; a stage split must not "
                                         "duplicate layers")
                    have[key] = sub
            elif have is not child:
                raise ValueError(f"pipeline stages both hold a module named {name!r}; cannot name its parameters")
        for name, p in m.named_parameters(recurse=False):
            view.register_parameter(name, p)
        for name, b in m.named_buffers(recurse=False):
            if name not in m._non_persistent_buffers_set:
                view.register_buffer(name, b)
    return view


def tensor_state(state: TrainState) -> dict:
    """{"model": ..., "optim": ...}: this rank's shards, FQN-keyed, for DCP. The tensors are
    the live ones (DCP copies them when staging, loads into them in place)."""
    view = model_view(state.modules)
    if state.optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(view, options=OPTIONS)}
    msd, osd = get_state_dict(view, state.optimizer, options=OPTIONS)
    return {"model": msd, "optim": osd}


def apply_tensor_state(state: TrainState, loaded: dict) -> None:
    view = model_view(state.modules)
    if state.optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(view, loaded["model"], options=OPTIONS)
        return
    set_state_dict(view, state.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=OPTIONS)


# ---------------------------------------------------------------- RNG (per rank, JSON)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng(accelerator: Any = None) -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    out = {"torch_cpu": _b64(torch.get_rng_state()),
           "python": [py_version, list(py_state), py_gauss],
           "numpy": [np_name, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}
    if accelerator is not None and accelerator.device_type != "cpu":
        out["device_type"] = accelerator.device_type
        out["device"] = _b64(accelerator.get_rng_state())
    return out


def restore_rng(saved: dict, accelerator: Any = None) -> str | None:
    """Restore what applies here; returns a note when the device RNG could not be (another
    device type wrote the checkpoint)."""
    torch.set_rng_state(_unb64(saved["torch_cpu"]))
    v, s, g = saved["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, gauss = saved["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    dev = accelerator.device_type if accelerator is not None else "cpu"
    if "device" in saved:
        if saved.get("device_type") == dev:
            accelerator.set_rng_state(_unb64(saved["device"]))
        else:
            return f"device RNG not restored: the checkpoint was written on {saved.get('device_type')}, this is {dev}"
    return None


__all__ = ["TrainState", "model_view", "tensor_state", "apply_tensor_state", "capture_rng", "restore_rng"]
