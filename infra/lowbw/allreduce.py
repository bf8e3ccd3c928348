"""Averaging all-reduces built from plain torch collectives, so they run on every backend
(gloo, NCCL, HCCL, CNCL, MCCL, XCCL) and across vendors whose libraries cannot talk.

- `FlatReducer`: one group. Cast codecs (fp32/bf16/fp16) ride `all_reduce`; block-quantized
  codecs (int8/fp8) run as a quantized reduce-scatter (`all_to_all` of codes + scales, then
  each rank dequantizes its chunk from every peer and sums in fp32) followed by an
  all-gather of the re-quantized reduced chunk. Both stages keep error-feedback residuals:
  stage 1 per sender, stage 2 on the chunk's owner (every rank receives the same stage-2
  codes, so replicas stay bit-identical).
- `HierarchicalReducer`: reduce-scatter inside a node (fast links, fp32), the codec's
  all-reduce across nodes on the 1/k shard (slow links: only here does compression pay),
  all-gather inside the node.

Bytes are counted as what this rank sends under the ring algorithm's accounting (the
Hockney alpha-beta model's bandwidth term; Patarasuk & Yuan 2009): an all-reduce of S bytes
over n ranks sends 2(n-1)/n·S per rank, a reduce-scatter or all-gather (n-1)/n·S.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from suanli.infra.lowbw.codecs import BlockQuant, Residuals, make_codec

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases have only the old names.
reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Flatten at most this many elements at once (64 MB of fp32): bounds the extra memory the
# flat buffer costs on a large model.
BUCKET_NUMEL = 1 << 24


def ring_allreduce_bytes(nbytes: int, n: int) -> int:
    return 0 if n <= 1 else int(2 * (n - 1) * nbytes / n)


def ring_half_bytes(nbytes: int, n: int) -> int:
    """Reduce-scatter or all-gather: half a ring all-reduce."""
    return 0 if n <= 1 else int((n - 1) * nbytes / n)


class FlatReducer:
    """Average a float32 1-D buffer over `group` with codec `codec_name`."""

    def __init__(self, group: dist.ProcessGroup | None, codec_name: str = "fp32", block: int = 256,
                 error_feedback: bool = True) -> None:
        self.group = group
        self.n = dist.get_world_size(group)
        self.codec_name = codec_name
        self.codec = make_codec(codec_name, block)
        self.sent_residual = Residuals(error_feedback)    # stage 1: my contribution
        self.owner_residual = Residuals(error_feedback)   # stage 2: the chunk I own

    def average_(self, buf: torch.Tensor, key: object = 0) -> int:
        if self.n == 1:
            return 0
        if isinstance(self.codec, BlockQuant):
            return self._quantized(buf, key)
        wire = buf.div_(self.n) if self.codec == torch.float32 else (buf / self.n).to(self.codec)
        dist.all_reduce(wire, group=self.group)
        if wire is not buf:
            buf.copy_(wire)
        return ring_allreduce_bytes(wire.numel() * wire.element_size(), self.n)

    def _quantized(self, buf: torch.Tensor, key: object) -> int:
        q, n, numel = self.codec, self.n, buf.numel()
        padded = q.padded(numel, n)
        x = torch.zeros(padded, dtype=torch.float32, device=buf.device)
        x[:numel] = buf
        x = self.sent_residual.compensate(key, x)
        codes, scales = q.quantize(x)
        self.sent_residual.update(key, x, q.dequantize(codes, scales))

        # Quantized reduce-scatter: chunk j of every rank goes to rank j.
        got_codes, got_scales = torch.empty_like(codes), torch.empty_like(scales)
        dist.all_to_all_single(got_codes, codes, group=self.group)
        dist.all_to_all_single(got_scales, scales, group=self.group)
        mine = q.dequantize(got_codes, got_scales).view(n, padded // n).sum(0).div_(n)

        mine = self.owner_residual.compensate(key, mine)
        codes2, scales2 = q.quantize(mine)
        self.owner_residual.update(key, mine, q.dequantize(codes2, scales2))
        all_codes = torch.empty(q.code_numel(padded), dtype=torch.uint8, device=buf.device)
        all_scales = torch.empty(padded // q.block, dtype=torch.float32, device=buf.device)
        all_gather_into(all_codes, codes2, group=self.group)
        all_gather_into(all_scales, scales2, group=self.group)
        buf.copy_(q.dequantize(all_codes, all_scales)[:numel])
        return 2 * ring_half_bytes(q.wire_bytes(padded), n)


class HierarchicalReducer:
    """Reduce-scatter in the node, `inner` across nodes on the shard, all-gather in the node."""

    def __init__(self, intra: dist.ProcessGroup, inner: FlatReducer) -> None:
        self.intra, self.inner = intra, inner
        self.k = dist.get_world_size(intra)

    def average_(self, buf: torch.Tensor, key: object = 0) -> int:
        k, numel = self.k, buf.numel()
        padded = -(-numel // k) * k
        x = torch.zeros(padded, dtype=torch.float32, device=buf.device)
        x[:numel] = buf
        shard = torch.empty(padded // k, dtype=torch.float32, device=buf.device)
        if k > 1:
            reduce_scatter_into(shard, x, op=dist.ReduceOp.SUM, group=self.intra)
            shard.div_(k)
        else:
            shard.copy_(x)
        sent = ring_half_bytes(padded * 4, k)
        sent += self.inner.average_(shard, key)
        if k > 1:
            all_gather_into(x, shard, group=self.intra)
        else:
            x.copy_(shard)
        buf.copy_(x[:numel])
        return sent + ring_half_bytes(padded * 4, k)


Reducer = FlatReducer | HierarchicalReducer


def reducer_state(reducer: Reducer) -> dict:
    """This rank's error-feedback residuals (they differ per rank), for checkpoints."""
    flat = reducer.inner if isinstance(reducer, HierarchicalReducer) else reducer
    return {"sent": flat.sent_residual.state_dict(), "owner": flat.owner_residual.state_dict()}


def load_reducer_state(reducer: Reducer, state: dict) -> None:
    flat = reducer.inner if isinstance(reducer, HierarchicalReducer) else reducer
    flat.sent_residual.load_state_dict(state["sent"])
    flat.owner_residual.load_state_dict(state["owner"])


def dedicated_group(ctx, backend: str | None = None) -> dist.ProcessGroup:
    """A second process group over this rank's data-parallel peers, for collectives issued
    from a background thread: on their own group they can never interleave with the training
    loop's. Collective over the whole world (every rank creates every data-parallel group's
    copy, in the same order, as `new_group` requires)."""
    backend = backend or dist.get_backend(ctx.dp_mesh.get_group())
    mine = None
    for ranks in data_parallel_groups(ctx.mesh):
        g = dist.new_group(ranks, backend=backend)
        if ctx.rank in ranks:
            mine = g
    if mine is None:
        raise RuntimeError(f"rank {ctx.rank} is in no data-parallel group")
    return mine


@torch.no_grad()
def average_tensors_(reducer: Reducer, tensors: list[torch.Tensor], key: object = "grads") -> int:
    """Average `tensors` in place across the reducer's ranks, flattened in buckets of at most
    BUCKET_NUMEL elements. Returns the bytes this rank sent."""
    sent, bucket, size, index = 0, [], 0, 0
    for t in tensors + [None]:
        if t is not None and (not bucket or size + t.numel() <= BUCKET_NUMEL):
            bucket.append(t)
            size += t.numel()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1).float() for b in bucket])
            sent += reducer.average_(flat, (key, index))
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            index += 1
        bucket, size = ([t], t.numel()) if t is not None else ([], 0)
    return sent


# ---------------------------------------------------------------- node membership


@dataclass
class Hierarchy:
    intra: dist.ProcessGroup      # my data-parallel peers on my node
    inter: dist.ProcessGroup      # one peer per node, same position in its node
    ranks_per_node: int
    n_nodes: int


def data_parallel_groups(mesh) -> list[list[int]]:
    """Global ranks of every data-parallel group of a ("pp","dp_replicate","dp_shard","tp")
    mesh, each in dp_rank order. Every rank computes the same list, with no communication."""
    t = mesh.mesh
    pp, dpr, dps, tp = t.shape
    return t.permute(0, 3, 1, 2).reshape(pp * tp, dpr * dps).tolist()


def node_ids(world_size: int, node_size: int = 0) -> list[object]:
    """Which node each global rank is on: consecutive blocks of `node_size` ranks, or (0) the
    hostname each rank reports."""
    if node_size > 0:
        if world_size % node_size:
            raise ValueError(f"comm.node_size: {node_size} does not divide the world size {world_size}")
        return [r // node_size for r in range(world_size)]
    names: list = [None] * world_size
    dist.all_gather_object(names, socket.gethostname())
    return names


def build_hierarchy(groups: list[list[int]], nodes: list[object], my_rank: int) -> Hierarchy:
    """Create intra- and inter-node groups for every data-parallel group. Collective over the
    whole world: every rank creates every group, in the same order, as `new_group` requires."""
    mine: Hierarchy | None = None
    for ranks in groups:
        by_node: dict[object, list[int]] = {}
        for r in ranks:
            by_node.setdefault(nodes[r], []).append(r)
        per_node = {len(v) for v in by_node.values()}
        if len(per_node) != 1:
            raise ValueError(f"comm.hierarchical: data-parallel ranks {ranks} are spread unevenly over nodes "
                             f"({ {str(k): len(v) for k, v in by_node.items()} }); hierarchical all-reduce needs the "
                             f"same number on every node (set comm.node_size, or comm.hierarchical = false)")
        members = list(by_node.values())
        k = len(members[0])
        intra = [dist.new_group(m) for m in members]
        inter = [dist.new_group([m[j] for m in members]) for j in range(k)]
        if my_rank in ranks:
            node = next(i for i, m in enumerate(members) if my_rank in m)
            mine = Hierarchy(intra[node], inter[members[node].index(my_rank)], k, len(members))
    if mine is None:
        raise RuntimeError(f"rank {my_rank} is in no data-parallel group {groups}")
    return mine
