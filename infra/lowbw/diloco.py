"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models") and its streaming, overlapped variant (Douillard et al. 2025, "Streaming
DiLoCo with overlapping communication", arXiv:2501.18512).

Each replica runs H inner steps with its own optimizer and no gradient sync. Then the
pseudo-gradient Δ = θ_global − θ_local is averaged over replicas (optionally in bf16/int8,
see codecs.py) and an outer optimizer steps θ_global with it: SGD with Nesterov momentum,
lr 0.7, momentum 0.9 by default (the paper's values). Every replica then restarts from the
new θ_global. Communication drops by a factor H.

Streaming: the parameters are cut into F contiguous fragments (in model order) and
fragment f is synced when (step + f·H/F) is a multiple of H, so each fragment still syncs
every H steps but only 1/F of the model is on the wire at once (peak bandwidth ÷ F).

Overlap (`overlap_steps` = τ > 0, the 2025 paper's §2.3): a fragment's averaging is
handed to a background thread on a process group of its own and the replica keeps training;
τ inner steps later the averaged Δ is taken (waiting only if the link is slower than τ
steps of compute), the outer optimizer steps θ_global, and the fragment's local weights,
which moved on during those τ steps, are merged rather than overwritten:
θ_local ← α·θ_local + (1 − α)·θ_global (α = `mix`; the paper found α = 0.5 works well and
keeps τ small, a few inner steps). One worker thread runs the launches in launch order,
which is the same on every rank, so collectives always pair up. τ = 0 is the blocking
algorithm above (local weights replaced, α unused). τ must be < H: a fragment's result
lands before that fragment's next launch.

Warm-up: the paper starts DiLoCo from a model already trained with plain data parallel
(24k steps); `warmup_steps` does the same inside one run: the first steps average
gradients every step (plain data parallel, through a reducer with the outer step's codec
and error feedback), and the outer loop starts from the weights that phase reaches.

With H = 1, outer lr 1 and momentum 0 the outer step sets θ to the replicas' mean; with a
linear inner optimizer (SGD) that is exactly data-parallel SGD. (AdamW's update is not
linear in the gradient, so the equality needs SGD; tests check it that way.)

Checkpoints: replicas differ between syncs (weights and inner optimizer state), so
`state_dict()` is per rank and holds this replica's weights and inner optimizer state too,
besides θ_global, the outer momentum, the error-feedback residuals and any averaged
fragment not yet applied (a save waits for syncs in flight and keeps their results).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from suanli.infra.lowbw.allreduce import Reducer, average_tensors_, reducer_state, load_reducer_state


def fragments(n_params: int, n_fragments: int) -> list[range]:
    """Split parameter indices into `n_fragments` contiguous, near-equal ranges."""
    n_fragments = max(1, min(n_fragments, n_params))
    base, extra = divmod(n_params, n_fragments)
    out, start = [], 0
    for f in range(n_fragments):
        size = base + (f < extra)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass
class InFlight:
    fragment: int
    due: int          # inner step (1-based, counted after warm-up) after which it is applied
    result: Future    # -> (averaged pseudo-gradients, bytes sent)


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class DiLoCo:
    def __init__(self, params: list[torch.nn.Parameter], reducer: Reducer, inner_steps: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, n_fragments: int = 1,
                 warmup_steps: int = 0, warmup_reducer: Reducer | None = None, start_step: int = 0,
                 overlap_steps: int = 0, mix: float = 0.5, inner_optimizer: torch.optim.Optimizer | None = None) -> None:
        if inner_steps < 1:
            raise ValueError(f"comm.diloco_inner_steps: must be >= 1 to enable DiLoCo, got {inner_steps}")
        if not 0 <= overlap_steps < inner_steps:
            raise ValueError(f"comm.diloco_overlap_steps: must be in [0, diloco_inner_steps) = [0, {inner_steps}), "
                             f"got {overlap_steps}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"comm.diloco_overlap_mix: must be in [0, 1], got {mix}")
        self.reducer, self.H = reducer, inner_steps
        self.params = [p for p in params if p.requires_grad]
        self.fragments = fragments(len(self.params), n_fragments)
        self.offsets = [(f * inner_steps) // len(self.fragments) for f in range(len(self.fragments))]
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.global_params: list[torch.Tensor] | None = None
        self.outer: list[torch.optim.Optimizer] = []
        self.outer_steps = 0
        self.warmup_steps, self.warmup_reducer = warmup_steps, warmup_reducer
        if warmup_steps and warmup_reducer is None:
            raise ValueError("DiLoCo: warmup_steps needs a warmup_reducer to average gradients with")
        self.steps_done = start_step   # a resumed job continues the schedule where it stopped
        self.tau, self.mix = overlap_steps, mix
        self.inner_optimizer = inner_optimizer
        self.in_flight: list[InFlight] = []
        self.wait_s = 0.0              # time the loop spent waiting for overlapped syncs
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="suanli-diloco") if overlap_steps else None

    def _capture(self) -> None:
        """Take the outer copy from the parameters as they are before the first step of this
        process — after any checkpoint was loaded, identical on every replica. fp32 whatever
        the parameters' dtype: outer updates are small differences of large numbers."""
        self.global_params = [p.detach().clone().float() for p in self.params]
        self._build_outer()

    def _build_outer(self) -> None:
        self.outer = [torch.optim.SGD([self.global_params[i] for i in frag], lr=self.outer_lr,
                                      momentum=self.outer_momentum, nesterov=self.outer_momentum > 0)
                      for frag in self.fragments]

    @torch.no_grad()
    def after_backward(self, grads: list[torch.Tensor]) -> int:
        """Inner steps sync nothing; warm-up steps average gradients like plain DP."""
        if self.global_params is None:
            self._capture()
        if self.steps_done >= self.warmup_steps:
            return 0
        return average_tensors_(self.warmup_reducer, grads, "diloco-warmup")

    def due(self, step: int) -> list[int]:
        """Fragments whose outer step falls after inner step `step` (1-based)."""
        return [f for f, off in enumerate(self.offsets) if (step + off) % self.H == 0]

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> int:
        self.steps_done = step
        if self.global_params is None:
            raise RuntimeError("DiLoCo: after_optimizer_step before after_backward; the trainer must call "
                               "comm.after_backward(params) every step")
        if step <= self.warmup_steps:
            for g, p in zip(self.global_params, self.params):
                g.copy_(p.detach())
            return 0
        inner = step - self.warmup_steps
        sent = 0
        for item in [x for x in self.in_flight if x.due <= inner]:
            self.in_flight.remove(item)
            sent += self._apply(item.fragment, item.result, self.mix)
        for f in self.due(inner):
            deltas = [self.global_params[i] - self.params[i].detach().float() for i in self.fragments[f]]
            if self._worker is None:
                sent += self._apply(f, _done((deltas, average_tensors_(self.reducer, deltas, ("diloco", f)))), 0.0)
            else:
                job = self._worker.submit(self._average, deltas, f)
                self.in_flight.append(InFlight(f, inner + self.tau, job))
        return sent

    def _average(self, deltas: list[torch.Tensor], f: int) -> tuple[list[torch.Tensor], int]:
        with torch.no_grad():
            return deltas, average_tensors_(self.reducer, deltas, ("diloco", f))

    def _apply(self, f: int, result: Future, mix: float) -> int:
        """Outer step for fragment `f` with its averaged pseudo-gradient, then merge."""
        if not result.done():
            start = time.perf_counter()
            result.result()
            self.wait_s += time.perf_counter() - start
        deltas, sent = result.result()
        idx = list(self.fragments[f])
        for i, d in zip(idx, deltas):
            self.global_params[i].grad = d
        self.outer[f].step()
        for i in idx:
            p, g = self.params[i], self.global_params[i]
            if mix == 0.0:
                p.copy_(g)
            else:
                p.mul_(mix).add_(g.to(p.dtype), alpha=1.0 - mix)
            g.grad = None
        self.outer_steps += 1
        return sent

    def close(self) -> None:
        """Let syncs in flight finish (their peers post the same collectives) and stop the
        worker; their results are dropped. Call before the process group is destroyed."""
        for item in self.in_flight:
            item.result.result()
        self.in_flight.clear()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    # ------------------------------------------------------------------ checkpoints (per rank)

    def _signature(self) -> dict:
        return {"n_params": len(self.params), "fragments": len(self.fragments), "H": self.H, "tau": self.tau,
                "shapes": [list(p.shape) for p in self.params]}

    @torch.no_grad()
    def state_dict(self) -> dict:
        pending = [{"fragment": x.fragment, "due": x.due, "result": x.result.result()} for x in self.in_flight]
        return {
            "signature": self._signature(), "steps_done": self.steps_done, "outer_steps": self.outer_steps,
            "params": [p.detach().clone() for p in self.params],
            "inner_optimizer": self.inner_optimizer.state_dict() if self.inner_optimizer is not None else None,
            "global": None if self.global_params is None else [g.clone() for g in self.global_params],
            "outer": [o.state_dict() for o in self.outer],
            "reducer": reducer_state(self.reducer),
            "warmup_reducer": reducer_state(self.warmup_reducer) if self.warmup_reducer is not self.reducer else None,
            "in_flight": pending,
        }

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        if sd.get("signature") != self._signature():
            raise ValueError(f"DiLoCo checkpoint state was written for {sd.get('signature')}, this run has "
                             f"{self._signature()}; resume with the same model and comm.diloco_* settings")
        for item in self.in_flight:   # a rollback: let the live syncs finish, then forget them
            item.result.result()
        self.in_flight = []
        for x in sd["in_flight"]:
            deltas, sent = x["result"]
            idx = self.fragments[x["fragment"]]
            deltas = [d.to(self.params[i].device) for i, d in zip(idx, deltas)]
            self.in_flight.append(InFlight(x["fragment"], x["due"], _done((deltas, sent))))
        self.steps_done, self.outer_steps = sd["steps_done"], sd["outer_steps"]
        for p, saved in zip(self.params, sd["params"]):
            p.copy_(saved)
        if self.inner_optimizer is not None and sd["inner_optimizer"] is not None:
            self.inner_optimizer.load_state_dict(sd["inner_optimizer"])
        if sd["global"] is None:
            self.global_params, self.outer = None, []
        else:
            self.global_params = [g.to(p.device) for g, p in zip(sd["global"], self.params)]
            self._build_outer()
            for o, saved in zip(self.outer, sd["outer"]):
                o.load_state_dict(saved)
        load_reducer_state(self.reducer, sd["reducer"])
        if sd["warmup_reducer"] is not None and self.warmup_reducer is not None:
            load_reducer_state(self.warmup_reducer, sd["warmup_reducer"])
