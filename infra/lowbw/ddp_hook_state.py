"""Checkpointable state of torch's DDP `powerSGD_hook` (registered by options._ddp_hook).

torch keys the hook's error-feedback residuals and warm-start P/Q matrices by DDP bucket
index, and DDP lays its buckets out twice: all parameters in one bucket at construction,
then, after the first iteration, rebuilt in the order the gradients became ready. A resumed
job constructs a fresh DDP, so its first step runs on the construction layout and later
steps on the rebuilt one, while the saved tensors were laid out for the old job's rebuilt
buckets: applied by index they would land on the wrong parameters (or not fit). So the
tensors are kept per parameter between layouts: saved per parameter, and cut into whatever
bucket layout the hook meets, re-cut when it changes. Every operation of the hook is per
parameter or element-wise, so the resumed run computes what the uninterrupted one does.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


class PowerSGDHookState:
    """One DDP module's PowerSGDState; call `before(bucket)` first in every compressed hook call."""

    def __init__(self, module: torch.nn.Module, state) -> None:
        self.state = state
        self.index = {id(p): i for i, p in enumerate(module.parameters())}
        self.layouts: dict[int, list[tuple]] = {}   # bucket index -> the layout torch's dicts follow
        self.loose: dict[int, dict] = {}            # param index -> pieces in no bucket yet

    def before(self, bucket) -> None:
        layout = self._layout(bucket)
        if self.layouts.get(bucket.index()) != layout:
            self.loose = self._pieces()
            for d in (self.state.error_dict, self.state.p_memory_dict, self.state.q_memory_dict):
                d.clear()
            self.layouts.clear()
            self._pack(bucket, layout)

    def _layout(self, bucket) -> list[tuple]:
        """(param, offset, numel, P offset, P length, Q offset, Q length) in torch's order:
        P and Q memory follow the compressed matrices grouped by shape, in first-seen order."""
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

        buf, s = bucket.buffer(), self.state
        rows, groups = [], defaultdict(list)
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            n = g.shape[0]
            m = g.numel() // n
            r = min(n, m, s.matrix_approximation_rank)
            rows.append([self.index[id(p)], (g.data_ptr() - buf.data_ptr()) // g.element_size(), g.numel()])
            if _should_compress(n, m, r, s.min_compression_rate)[0]:
                groups[(n, m)].append((rows[-1], n * r, m * r))
        p_off = q_off = 0
        for members in groups.values():
            for row, p_len, q_len in members:
                row += [p_off, p_len, q_off, q_len]
                p_off, q_off = p_off + p_len, q_off + q_len
        return [tuple(row + [None] * (7 - len(row))) for row in rows]

    def _pieces(self) -> dict[int, dict]:
        """Every parameter's residual, P and Q, wherever they are now."""
        out = {k: dict(v) for k, v in self.loose.items()}
        s = self.state
        for b, layout in self.layouts.items():
            err, pm, qm = s.error_dict.get(b), s.p_memory_dict.get(b), s.q_memory_dict.get(b)
            for i, off, numel, po, pl, qo, ql in layout:
                piece = out.setdefault(i, {})
                if err is not None:
                    piece["error"] = err[off:off + numel]
                if po is not None and pm is not None and qm is not None:
                    piece["p"], piece["q"] = pm[po:po + pl], qm[qo:qo + ql]
        return out

    def _pack(self, bucket, layout) -> None:
        buf, s, b = bucket.buffer(), self.state, bucket.index()
        here = [self.loose.get(row[0], {}) for row in layout]
        if s.use_error_feedback and any("error" in x for x in here):
            # a parameter without a residual starts from zero, as torch starts a new bucket
            err = torch.zeros(buf.numel(), device=buf.device, dtype=buf.dtype)
            for (_, off, numel, *_), x in zip(layout, here):
                if "error" in x:
                    err[off:off + numel].copy_(x["error"])
            s.error_dict[b] = err
        compressed = [(row, x) for row, x in zip(layout, here) if row[3] is not None]
        if s.warm_start and compressed and all("p" in x for _, x in compressed):
            # all or nothing: torch draws fresh Qs for a bucket without memory
            s.p_memory_dict[b] = _join([(row[3], x["p"]) for row, x in compressed], buf)
            s.q_memory_dict[b] = _join([(row[5], x["q"]) for row, x in compressed], buf)
        for row in layout:
            self.loose.pop(row[0], None)
        self.layouts[b] = layout

    def state_dict(self) -> dict:
        s = self.state
        _, keys, pos, has_gauss, gauss = s.rng.get_state()
        pieces = {i: {k: v.detach().to("cpu", copy=True) for k, v in x.items()} for i, x in self._pieces().items()}
        return {"iter": s.iter, "rng_keys": torch.from_numpy(keys.astype(np.int64)), "rng_pos": int(pos),
                "rng_has_gauss": int(has_gauss), "rng_gauss": float(gauss), "params": pieces,
                "numel_before": s.total_numel_before_compression, "numel_after": s.total_numel_after_compression}

    def load_state_dict(self, sd: dict) -> None:
        s = self.state
        s.iter = int(sd["iter"])
        s.rng.set_state(("MT19937", sd["rng_keys"].numpy().astype(np.uint32), sd["rng_pos"], sd["rng_has_gauss"],
                         sd["rng_gauss"]))
        s.total_numel_before_compression, s.total_numel_after_compression = sd["numel_before"], sd["numel_after"]
        for d in (s.error_dict, s.p_memory_dict, s.q_memory_dict):
            d.clear()
        self.layouts.clear()
        self.loose = {int(i): dict(x) for i, x in sd["params"].items()}


def _join(parts: list[tuple[int, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    total = max(off + t.numel() for off, t in parts)
    out = torch.empty(total, device=like.device, dtype=like.dtype)
    for off, t in parts:
        out[off:off + t.numel()].copy_(t)
    return out


class PowerSGDHookStates:
    """The comm part (CommOptions.parts["powersgd_ddp"]): one PowerSGDHookState per DDP module."""

    def __init__(self) -> None:
        self.modules: list[PowerSGDHookState] = []

    def add(self, module, state) -> PowerSGDHookState:
        self.modules.append(PowerSGDHookState(module, state))
        return self.modules[-1]

    def state_dict(self) -> dict:
        return {"modules": [m.state_dict() for m in self.modules]}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["modules"]) != len(self.modules):
            raise ValueError(f"powerSGD_hook state: checkpoint has {len(sd['modules'])} DDP module(s), "
                             f"this job {len(self.modules)}")
        for m, x in zip(self.modules, sd["modules"]):
            m.load_state_dict(x)
