"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models") and its streaming variant (Douillard et al. 2025, "Streaming DiLoCo with
overlapping communication").

Each replica runs H inner steps with its own optimizer and no gradient sync. Then the
pseudo-gradient Δ = θ_global − θ_local is averaged over replicas (optionally in bf16/int8,
see codecs.py) and an outer optimizer steps θ_global with it: SGD with Nesterov momentum,
lr 0.7, momentum 0.9 by default (the paper's values). Every replica then restarts from the
new θ_global. Communication drops by a factor H.

Streaming: the parameters are cut into F contiguous fragments (in model order) and
fragment f is synced when (step + f·H/F) is a multiple of H, so each fragment still syncs
every H steps but only 1/F of the model is on the wire at once (peak bandwidth ÷ F).

Warm-up: the paper starts DiLoCo from a model already trained with plain data parallel
(24k steps); `warmup_steps` does the same inside one run: the first steps average
gradients every step (plain data parallel, through the same reducer and codec as the outer
step), and the outer loop starts from the weights that phase reaches. From-scratch DiLoCo
trails plain DP most in its first few hundred steps.

With H = 1, outer lr 1 and momentum 0 the outer step sets θ to the replicas' mean; with a
linear inner optimizer (SGD) that is exactly data-parallel SGD. (AdamW's update is not
linear in the gradient, so the equality needs SGD; tests check it that way.)
"""

from __future__ import annotations

import torch

from suanli.infra.lowbw.allreduce import Reducer, average_tensors_


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


class DiLoCo:
    def __init__(self, params: list[torch.nn.Parameter], reducer: Reducer, inner_steps: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, n_fragments: int = 1,
                 warmup_steps: int = 0, warmup_reducer: Reducer | None = None, start_step: int = 0) -> None:
        if inner_steps < 1:
            raise ValueError(f"comm.diloco_inner_steps: must be >= 1 to enable DiLoCo, got {inner_steps}")
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

    def _capture(self) -> None:
        """Take the outer copy from the parameters as they are before the first step of this
        process — after any checkpoint was loaded, identical on every replica. fp32 whatever
        the parameters' dtype: outer updates are small differences of large numbers."""
        self.global_params = [p.detach().clone().float() for p in self.params]
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
        sent = 0
        for f in self.due(step - self.warmup_steps):
            idx = list(self.fragments[f])
            deltas = [self.global_params[i] - self.params[i].detach().float() for i in idx]
            sent += average_tensors_(self.reducer, deltas, ("diloco", f))
            for i, d in zip(idx, deltas):
                self.global_params[i].grad = d
            self.outer[f].step()
            for i in idx:
                self.params[i].copy_(self.global_params[i])
                self.global_params[i].grad = None
            self.outer_steps += 1
        return sent
