"""PowerSGD (Vogels, Karimireddy & Jaggi, NeurIPS 2019, Algorithm 1) for data-parallel
gradients that DDP does not own: rank-r power iteration with warm start and error feedback.

For each gradient matrix M (n × m, a tensor's first dimension by the rest), with Q (m × r)
kept from the previous step:
    P = mean_over_ranks(M Q);  P ← orthonormal(P);  Q = mean_over_ranks(Mᵀ P);  M̂ = P Qᵀ
and M - M̂ (this rank's compression error) is added to the next step's M. All P's travel in
one all-reduce, all Q's in a second, and the tensors not worth compressing (vectors, and
matrices where (n+m)·r is not at least `min_compression_rate` times smaller than n·m) in a
third: three collectives per step, (n+m)·r floats per compressed matrix instead of n·m.

The first `warmup_steps` steps use a plain fp32 all-reduce, as torch's hook does with
`start_powerSGD_iter` (the paper's experiments also start from plain SGD for a few epochs).
Where DDP is used, options.py registers torch's `powerSGD_hook` instead; this class is for
the replicated-DP path DDP does not manage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from suanli.infra.lowbw.allreduce import FlatReducer, average_tensors_, ring_allreduce_bytes


class PowerSGD:
    def __init__(self, group: dist.ProcessGroup | None, rank: int = 4, warmup_steps: int = 10,
                 error_feedback: bool = True, min_compression_rate: float = 2.0, seed: int = 0) -> None:
        self.group, self.rank = group, rank
        self.n = dist.get_world_size(group)
        self.warmup_steps, self.error_feedback = warmup_steps, error_feedback
        self.min_compression_rate, self.seed = min_compression_rate, seed
        self.steps = 0
        self._fp32 = FlatReducer(group, "fp32")
        self._q: dict[int, torch.Tensor] = {}
        self._error: dict[int, torch.Tensor] = {}

    def _compressible(self, g: torch.Tensor) -> bool:
        if g.ndim < 2:
            return False
        n, m = g.shape[0], g.numel() // g.shape[0]
        r = min(n, m, self.rank)
        return (n + m) * r * self.min_compression_rate < n * m

    def _initial_q(self, i: int, m: int, r: int, like: torch.Tensor) -> torch.Tensor:
        # The same seed on every rank: all replicas must project onto the same subspace.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(m, r, generator=gen).to(device=like.device, dtype=torch.float32)

    @torch.no_grad()
    def average_(self, grads: list[torch.Tensor]) -> int:
        """Replace each gradient with the compressed global average. Returns bytes sent."""
        self.steps += 1
        if self.n == 1:
            return 0
        if self.steps <= self.warmup_steps:
            return average_tensors_(self._fp32, grads, "powersgd-warmup")

        compress = [i for i, g in enumerate(grads) if self._compressible(g)]
        skip = set(compress)
        plain = [g for i, g in enumerate(grads) if i not in skip]
        sent = average_tensors_(self._fp32, plain, "powersgd-plain") if plain else 0

        mats, ps, qs = {}, {}, {}
        for i in compress:
            g = grads[i]
            m = g.reshape(g.shape[0], -1).float()
            if self.error_feedback and i in self._error:
                m = m + self._error[i]
            r = min(m.shape[0], m.shape[1], self.rank)
            if i not in self._q:
                self._q[i] = self._initial_q(i, m.shape[1], r, m)
            mats[i] = m
            ps[i] = m @ self._q[i]
        sent += self._mean_(ps)
        for i in compress:
            ps[i] = torch.linalg.qr(ps[i], mode="reduced").Q
            qs[i] = mats[i].t() @ ps[i]
        sent += self._mean_(qs)
        for i in compress:
            approx = ps[i] @ qs[i].t()
            if self.error_feedback:
                self._error[i] = mats[i] - approx
            self._q[i] = qs[i]  # warm start: next step's power iteration starts here
            grads[i].copy_(approx.view_as(grads[i]))
        return sent

    def state_dict(self) -> dict:
        """Per rank: the error differs per rank; Q is shared but cheap to keep with it."""
        return {"steps": self.steps, "q": [[i, q.clone()] for i, q in self._q.items()],
                "error": [[i, e.clone()] for i, e in self._error.items()]}

    def load_state_dict(self, sd: dict) -> None:
        self.steps = sd["steps"]
        self._q = {i: q for i, q in sd["q"]}
        self._error = {i: e for i, e in sd["error"]}

    def _mean_(self, parts: dict[int, torch.Tensor]) -> int:
        if not parts:
            return 0
        keys = list(parts)
        flat = torch.cat([parts[k].reshape(-1) for k in keys])
        flat.div_(self.n)
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for k in keys:
            parts[k] = flat[offset:offset + parts[k].numel()].view_as(parts[k])
            offset += parts[k].numel()
        return ring_allreduce_bytes(flat.numel() * 4, self.n)
