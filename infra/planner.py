"""Bandwidth-aware parallel planner: which tp × pp × dp × micro-batch × recompute × comm
option to run, predicted from a memory model and an alpha-beta time model.

Topology file (JSON, written by `probe_topology` / `suanli bench comm --topology-out`):

    {"format": "suanli-topology", "version": 1, "source": "probe" | "manual",
     "devices_per_node": 8,
     "links": {"intra_node": {"alpha_s": 4e-06, "bandwidth_gbps": 3600.0},
               "inter_node": {"alpha_s": 2e-05, "bandwidth_gbps": 25.0}},
     "measured": {...raw samples...}}

`bandwidth_gbps` is Gbit/s: per device for intra_node (one device's link to its node
peers), per node for inter_node (all of the node's NICs, shared by every device of the
node that talks across nodes at the same time). `alpha_s` is the per-message latency.

Time model (Hockney's alpha-beta model: a message of S bytes costs alpha + S/bw):
  ring all-reduce over n ranks  2(n-1)·alpha + 2(n-1)/n · S/bw
  reduce-scatter / all-gather   (n-1)·alpha + (n-1)/n · S/bw
  point-to-point                alpha + S/bw
A ring that crosses nodes is limited by its inter-node hop, whose bandwidth is the node's
divided by the rings crossing at once (devices per node / ring members per node).

  compute per micro-batch  = hardware FLOPs (bench/flops.py, recompute included)
                             / (peak FLOP/s × achievable fraction)
  pipeline (1F1B)          = (m + pp - 1) × (compute + TP comm + 2 p2p) per micro-batch
  optimizer                = clip + AdamW over the parameters this device holds (memory-bound)
  data-parallel sync       = the option's bytes, exposed beyond the last micro-batch's
                             backward where torch overlaps it (DDP/FSDP buckets, DDP hooks);
                             suanli's manual path (int8 all-reduce, DiLoCo) runs after
                             backward and is fully exposed.
Peak FLOP/s comes from the HAL's table (backends/peak_flops.py). The default achievable
fraction 0.5 is the end-to-end share of peak large dense-transformer trainings report
(Megatron-LM, Narayanan et al. 2021: 52% of A100 peak at 1T parameters; MegaScale, Jiang
et al. 2024: 55% MFU), and compute here excludes communication and bubbles, which are
modelled separately — so it is if anything conservative; `--achievable` overrides it.

Memory model (bytes per device, mixed precision as suanli trains: fp32 master weights,
fp32 gradients, AdamW's two fp32 moments = 16 bytes per parameter; DDP adds its 4-byte
gradient buckets; FSDP divides the 16 by its shard size and holds two unsharded layers):
activations per layer and token (values; × 2 bytes in bf16, 4 in fp32), from what the
reference model's backward keeps (h = dim, kv = n_kv_heads·head_dim, f = ffn_dim):
  none 7h + 3kv + 4f  |  selective 5h + 2kv + 2f  |  full h (+ one layer's worth while
  recomputing), all ÷ tp (tensor + sequence parallel), with flash-style attention that stores
no scores (compare Korthikanti et al. 2022: 34·s·b·h bytes per layer for GPT).
1F1B's first stage holds min(pp, m) micro-batches in flight; the last stage also holds the
logits and their fp32 loss copy. Usable memory is 90% of the device's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from suanli.infra.model import ModelConfig, preset

TOPOLOGY_FORMAT, TOPOLOGY_VERSION = "suanli-topology", 1
USABLE_MEMORY = 0.90
DEFAULT_ACHIEVABLE = 0.5
GiB = 1 << 30

# Device memory (GiB, per device as torch sees it), keyed by backends.peak_flops PeakRow labels.
DEVICE_MEMORY_GIB: dict[str, float] = {
    "H100 NVL": 94, "H100 PCIe": 80, "H100 SXM": 80,          # NVIDIA H100 datasheet
    "H200 NVL": 141, "H200 SXM": 141,                         # NVIDIA H200 datasheet
    "H800 PCIe": 80, "H800 SXM": 80, "H20": 96,               # NVIDIA H800 datasheet; HGX H20 brief
    "A800": 80, "A100": 80,                                   # 80 GB parts (40 GB A100s: pass --memory-gib 40)
    "L40S": 48,                                               # NVIDIA L40S datasheet
    "MI300X": 192,                                            # AMD Instinct MI300X datasheet
    "MI250X (per GCD)": 64, "MI250 (per GCD)": 64,            # 128 GB per OAM, two GCDs
    "Ascend 910 (910A)": 32,                                  # Huawei Ascend 910 (32 GB HBM2)
    "MTT S4000": 48,                                          # Moore Threads S4000 specifications
}

COMM_OPTIONS = {
    # data-parallel kind -> options the suanli runtime supports for it (infra/lowbw/options.py)
    "none": ("fp32",),
    "ddp": ("fp32", "bf16", "int8", "powersgd", "diloco", "diloco-int8"),
    "fsdp": ("fp32", "bf16", "int8"),
    "hsdp": ("fp32", "bf16", "int8"),
}
RECOMPUTE = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8)


# ---------------------------------------------------------------- links and topology


@dataclass(frozen=True)
class Link:
    alpha_s: float          # latency per message
    bandwidth_gbps: float   # Gbit/s

    @property
    def beta(self) -> float:
        """Seconds per byte."""
        return 8.0 / (self.bandwidth_gbps * 1e9)


@dataclass
class Topology:
    intra: Link
    inter: Link | None
    devices_per_node: int
    source: str = "manual"
    measured: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        links = {"intra_node": asdict(self.intra)}
        if self.inter is not None:
            links["inter_node"] = asdict(self.inter)
        return {"format": TOPOLOGY_FORMAT, "version": TOPOLOGY_VERSION, "source": self.source,
                "devices_per_node": self.devices_per_node, "links": links, "measured": self.measured}


def _link(d: dict, where: str) -> Link:
    for k in ("alpha_s", "bandwidth_gbps"):
        v = d.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 \
                or (k == "bandwidth_gbps" and v == 0):
            raise ValueError(f"{where}.{k}: expected a positive number, got {v!r}")
    return Link(float(d["alpha_s"]), float(d["bandwidth_gbps"]))


def topology_from_dict(d: dict, origin: str = "topology") -> Topology:
    if not isinstance(d, dict) or d.get("format") != TOPOLOGY_FORMAT:
        raise ValueError(f"{origin}: not a suanli topology file (expected \"format\": \"{TOPOLOGY_FORMAT}\"); "
                         f"write one with `suanli bench comm --topology-out FILE`")
    if d.get("version") != TOPOLOGY_VERSION:
        raise ValueError(f"{origin}: version {d.get('version')!r} is not supported (this suanli reads "
                         f"version {TOPOLOGY_VERSION})")
    links = d.get("links")
    if not isinstance(links, dict) or "intra_node" not in links:
        raise ValueError(f"{origin}: links.intra_node is missing")
    dpn = d.get("devices_per_node")
    if not isinstance(dpn, int) or dpn < 1:
        raise ValueError(f"{origin}: devices_per_node must be an integer >= 1, got {dpn!r}")
    inter = _link(links["inter_node"], f"{origin}: links.inter_node") if "inter_node" in links else None
    return Topology(_link(links["intra_node"], f"{origin}: links.intra_node"), inter, dpn,
                    str(d.get("source", "manual")), d.get("measured", {}))


def read_topology(path: str | Path) -> Topology:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--topology: {str(p)!r} not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--topology: {p} is not valid JSON: {e}") from None
    return topology_from_dict(data, str(p))


def write_topology(topo: Topology, path: str | Path) -> None:
    Path(path).write_text(json.dumps(topo.to_dict(), indent=2) + "\n")


def fit_alpha_beta(samples: list[tuple[int, float]], n: int) -> Link:
    """Least-squares fit of t = 2(n-1)·alpha + 2(n-1)/n·S·beta to (bytes S, seconds t) samples
    of a ring all-reduce over n ranks; both coefficients kept non-negative."""
    import numpy as np

    if n < 2 or len(samples) < 2:
        raise ValueError("fit_alpha_beta: needs >= 2 ranks and >= 2 message sizes")
    a = np.array([[2 * (n - 1), 2 * (n - 1) / n * s] for s, _ in samples], dtype=float)
    t = np.array([x for _, x in samples], dtype=float)
    # Relative residuals: small messages (latency) and large ones (bandwidth) count alike.
    w = 1.0 / t
    coef, *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
    alpha, beta = float(coef[0]), float(coef[1])
    if beta <= 0:  # latency-dominated samples: bandwidth from the largest message alone
        s, x = max(samples)
        beta = max(x - 2 * (n - 1) * max(alpha, 0.0), 1e-12) / (2 * (n - 1) / n * s)
    if alpha < 0:
        alpha = 0.0
    return Link(alpha, 8.0 / beta / 1e9)


def _time_allreduce(group, nbytes: int, iters: int, device) -> float:
    import time

    import torch
    import torch.distributed as dist

    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    for _ in range(2):
        dist.all_reduce(buf, group=group)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf, group=group)
    if device.type != "cpu":
        torch.accelerator.synchronize()
    t = torch.tensor([(time.perf_counter() - start) / iters])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # done when the last rank is
    return float(t.item())


def probe_topology(ctx, sizes: tuple[int, ...] = (1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22), iters: int = 5,
                   path: str | Path | None = None, node_size: int = 0) -> dict:
    """Measure alpha and bandwidth per link class on the running job and return (rank 0 also
    writes to `path`) a topology dict. Collective: every rank of the world must call it.

    Nodes come from hostnames (or `node_size` consecutive ranks). Intra-node: an all-reduce
    inside each node. Inter-node: an all-reduce among the ranks at the same position of
    every node; all positions run at once, as they do in training, so the fitted ring
    bandwidth is multiplied by the ranks per node to give the node's aggregate."""
    import torch.distributed as dist

    from suanli.infra.lowbw.allreduce import build_hierarchy, node_ids

    world = dist.get_world_size()
    if world < 2:
        raise ValueError("probe_topology: needs at least 2 processes (start with --nproc 2 or more)")
    h = build_hierarchy([list(range(world))], node_ids(world, node_size), dist.get_rank())
    measured: dict = {}
    links: dict[str, Link] = {}
    for name, group, n in (("intra_node", h.intra, h.ranks_per_node), ("inter_node", h.inter, h.n_nodes)):
        if n < 2:
            continue
        samples = [(s, _time_allreduce(group, s, iters, ctx.device)) for s in sizes]
        fit = fit_alpha_beta(samples, n)
        if name == "inter_node":
            fit = Link(fit.alpha_s, fit.bandwidth_gbps * h.ranks_per_node)
        links[name] = fit
        measured[name] = {"ranks": n, "concurrent_rings": h.ranks_per_node if name == "inter_node" else h.n_nodes,
                          "samples": [{"bytes": s, "seconds": t} for s, t in samples]}
    if "intra_node" not in links:
        # One rank per node: there is no intra-node link to measure; the planner then needs
        # --intra-gbps, so record the inter-node fit and say so.
        measured["note"] = "one rank per node: intra_node copied from inter_node"
        links["intra_node"] = links["inter_node"]
    topo = Topology(links["intra_node"], links.get("inter_node"), h.ranks_per_node, "probe",
                    {"backend": dist.get_backend(), "world_size": world, **measured})
    if path is not None and dist.get_rank() == 0:
        write_topology(topo, path)
    return topo.to_dict()


# ---------------------------------------------------------------- hardware


@dataclass
class Hardware:
    name: str
    flops_per_s: float          # achievable dense FLOP/s per device (peak × fraction)
    memory_bytes: float
    devices_per_node: int
    intra: Link
    inter: Link
    overlap: bool = True        # torch overlaps DDP/FSDP comm with backward (not on a shared CPU)
    peak_flops: float | None = None
    # Clip + AdamW per parameter held: memory-bound, it reads weights, grads and both moments
    # and writes three of them, ~28 bytes, plus the norm's read of the grads (~32 B in all);
    # at ~2 TB/s of HBM that is 1.6e-11 s. The CPU validation measures its own.
    optimizer_s_per_param: float = 32 / 2e12


def device_row(device_type: str):
    from suanli.backends.peak_flops import PEAK_TABLE, match_row

    # A table label ("MTT S4000", "H100 PCIe") or anything the HAL's device-name patterns match.
    row = next((r for r in PEAK_TABLE if r.label.lower() == device_type.strip().lower()), None) \
        or match_row(device_type)
    if row is None:
        raise ValueError(f"--device-type: '{device_type}' matches no known device; known: "
                         f"{', '.join(r.label for r in PEAK_TABLE)} (or give --peak-tflops and --memory-gib)")
    return row


def hardware(device_type: str, devices_per_node: int, intra_gbps: float | None, inter_gbps: float | None,
             topology: Topology | None = None, dtype: str = "bf16", achievable: float = DEFAULT_ACHIEVABLE,
             peak_tflops: float | None = None, memory_gib: float | None = None,
             intra_latency_us: float = 5.0, inter_latency_us: float = 20.0) -> Hardware:
    """Resolve a device name and link figures (flags win over the topology file)."""
    from suanli.backends.peak_flops import lookup_peak_flops

    if not 0 < achievable <= 1:
        raise ValueError(f"--achievable: must be in (0, 1], got {achievable}")
    label = device_type
    if peak_tflops is None or memory_gib is None:
        row = device_row(device_type)
        label = row.label
    peak = peak_tflops * 1e12 if peak_tflops else lookup_peak_flops(label, dtype)
    if not peak:
        raise ValueError(f"--device-type: the peak table has no {dtype} figure for {label}; pass --peak-tflops")
    mem = (memory_gib if memory_gib else DEVICE_MEMORY_GIB.get(label)) or 0
    if mem <= 0:
        raise ValueError(f"--device-type: no memory size known for {label}; pass --memory-gib")
    if topology is not None:
        intra = topology.intra if intra_gbps is None else Link(topology.intra.alpha_s, intra_gbps)
        base_inter = topology.inter or Link(inter_latency_us * 1e-6, inter_gbps or 0.0)
        inter = base_inter if inter_gbps is None else Link(base_inter.alpha_s, inter_gbps)
    else:
        if intra_gbps is None or inter_gbps is None:
            raise ValueError("--intra-gbps and --inter-gbps: both are needed without --topology FILE")
        intra, inter = Link(intra_latency_us * 1e-6, intra_gbps), Link(inter_latency_us * 1e-6, inter_gbps)
    for name, link in (("--intra-gbps", intra), ("--inter-gbps", inter)):
        if not link.bandwidth_gbps > 0:
            raise ValueError(f"{name}: must be > 0, got {link.bandwidth_gbps}")
    return Hardware(label, peak * achievable, mem * GiB, devices_per_node, intra, inter, True, peak)


# ---------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    dp_kind: str            # none | ddp | fsdp | hsdp
    dp_shard: int           # FSDP shard size (hsdp: ranks per node; fsdp: dp)
    micro_batch: int
    n_micro: int            # micro-batches per replica per step
    recompute: str
    comm: str

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.dp_shard if self.dp_kind in ("fsdp", "hsdp") else self.dp

    def label(self) -> str:
        return (f"tp{self.tp} pp{self.pp} dp{self.dp}({self.dp_kind}) mb{self.micro_batch}x{self.n_micro} "
                f"{self.recompute} {self.comm}")


@dataclass
class Job:
    model: ModelConfig
    devices: int
    seq_len: int = 4096
    global_batch: int = 512        # sequences per optimizer step
    dtype: str = "bf16"
    powersgd_rank: int = 4
    diloco_h: int = 50

    @property
    def act_bytes(self) -> int:
        return 2 if self.dtype == "bf16" else 4


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_choices(cfg: ModelConfig) -> list[int]:
    return [t for t in _divisors(cfg.n_heads)
            if cfg.n_kv_heads % t == 0 and cfg.ffn_dim % t == 0 and cfg.vocab_size % t == 0]


def dp_members_per_node(tp: int, dp: int, dpn: int) -> int:
    """Ranks of one data-parallel group on one node (suanli's mesh puts tp innermost, then dp)."""
    return max(1, min(dp, dpn // tp)) if tp <= dpn else 1


def enumerate_layouts(job: Job, devices_per_node: int):
    cfg = job.model
    for tp in tp_choices(cfg):
        if job.devices % tp:
            continue
        for pp in _divisors(job.devices // tp):
            if pp > cfg.n_layers or (pp > 1 and cfg.tie_embeddings):
                continue
            dp = job.devices // (tp * pp)
            if job.global_batch % dp:
                continue
            local = job.global_batch // dp
            k = dp_members_per_node(tp, dp, devices_per_node)
            kinds = ["none"] if dp == 1 else (["ddp"] if tp == pp == 1 else []) + ["fsdp"] + \
                (["hsdp"] if 1 < k < dp else [])
            for kind in kinds:
                shard = {"none": 1, "ddp": 1, "fsdp": dp, "hsdp": k}[kind]
                for mb in MICRO_BATCHES:
                    if local % mb:
                        continue
                    for rc in RECOMPUTE:
                        for comm in COMM_OPTIONS[kind]:
                            yield Layout(tp, pp, dp, kind, shard, mb, local // mb, rc, comm)


# ---------------------------------------------------------------- memory


def _layer_params(cfg: ModelConfig) -> int:
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    return 2 * d * cfg.n_heads * cfg.head_dim + 2 * d * kv + 3 * d * cfg.ffn_dim + 2 * d


def stage_params(cfg: ModelConfig, pp: int, tp: int) -> int:
    """Parameters on the heaviest pipeline stage's device (tensor-parallel shard)."""
    from suanli.infra.pipeline import split_layers

    counts = split_layers(cfg.n_layers, pp, [])
    emb = cfg.vocab_size * cfg.dim
    head = (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim) + cfg.dim
    per_stage = [c * _layer_params(cfg) for c in counts]
    per_stage[0] += emb
    per_stage[-1] += head
    return math.ceil(max(per_stage) / tp)


def activation_values_per_token(cfg: ModelConfig, recompute: str) -> float:
    h, kv, f = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    return {"none": 7 * h + 3 * kv + 4 * f, "selective": 5 * h + 2 * kv + 2 * f, "full": h}[recompute]


def memory(job: Job, lay: Layout) -> dict[str, float]:
    cfg, s, b = job.model, job.seq_len, lay.micro_batch
    from suanli.infra.pipeline import split_layers

    p = stage_params(cfg, lay.pp, lay.tp)
    layer_p = _layer_params(cfg) / lay.tp
    if lay.dp_kind in ("fsdp", "hsdp"):
        states = 16 * p / lay.dp_shard + 2 * layer_p * (job.act_bytes + 4)   # + two unsharded layers
        states += 2 * cfg.vocab_size * cfg.dim / lay.tp * job.act_bytes if lay.pp == 1 else 0  # root unit
    else:
        states = (20 if lay.dp_kind == "ddp" else 16) * p
    layers = max(split_layers(cfg.n_layers, lay.pp, []))
    tokens = s * b
    per_layer = activation_values_per_token(cfg, lay.recompute) * tokens * job.act_bytes / lay.tp
    in_flight = min(lay.pp, lay.n_micro) if lay.pp > 1 else 1
    acts = layers * per_layer * in_flight
    if lay.recompute == "full":
        acts += activation_values_per_token(cfg, "none") * tokens * job.act_bytes / lay.tp
    logits = tokens * cfg.vocab_size / lay.tp * (job.act_bytes + 8)
    return {"states": states, "activations": acts, "logits": logits, "total": states + acts + logits}


# ---------------------------------------------------------------- time


def _ring(nbytes: float, n: int, link: Link, concurrent: int = 1, half: bool = False) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = (n - 1) * (1 if half else 2)
    return steps * link.alpha_s + steps / n * nbytes * link.beta * concurrent


def _group_link(hw: Hardware, span_nodes: bool, members_per_node: int) -> tuple[Link, int]:
    """The slowest hop of a ring and how many rings share it."""
    if not span_nodes:
        return hw.intra, 1
    return hw.inter, max(1, hw.devices_per_node // members_per_node)


def powersgd_ratio(cfg: ModelConfig, rank: int, tp: int) -> float:
    """Floats PowerSGD sends per gradient float for this model (torch's compress test)."""
    d, kv, f, v = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim // tp, cfg.vocab_size // tp
    q = cfg.n_heads * cfg.head_dim // tp
    mats = [(q, d), (kv // tp or 1, d), (kv // tp or 1, d), (d, q), (f, d), (f, d), (d, f)]
    sent = total = 0
    for n, m in mats:
        r = min(n, m, rank)
        total += n * m
        sent += (n + m) * r if (n + m) * r * 2 < n * m else n * m
    layer_ratio = sent / total
    r = min(v, d, rank)
    emb_ratio = (v + d) * r / (v * d)
    n_layer = cfg.n_layers * total
    return (layer_ratio * n_layer + emb_ratio * 2 * v * d) / (n_layer + 2 * v * d)


def grad_sync_bytes(job: Job, lay: Layout, params: float) -> float:
    """Bytes one data-parallel all-reduce (or reduce-scatter) input holds for this option."""
    per = {"fp32": 4.0, "bf16": 2.0, "int8": 1 + 4 / 256, "diloco": 4.0, "diloco-int8": 1 + 4 / 256}
    if lay.comm == "powersgd":
        return params * 4 * powersgd_ratio(job.model, job.powersgd_rank, lay.tp)
    return params * per[lay.comm]


def step_time(job: Job, lay: Layout, hw: Hardware) -> dict[str, float]:
    from suanli.bench.flops import hardware_flops_per_token
    from suanli.infra.pipeline import split_layers

    cfg, s, b = job.model, job.seq_len, lay.micro_batch
    dpn = hw.devices_per_node
    tokens_mb = s * b
    # Per-device share of one micro-batch's work on the heaviest stage (the last: it has the head).
    head = 3 * 2 * cfg.dim * cfg.vocab_size   # the output head is never recomputed
    blocks_and_attn = hardware_flops_per_token(cfg, s, lay.recompute) - head
    layers = max(split_layers(cfg.n_layers, lay.pp, []))
    flops_mb = tokens_mb * (blocks_and_attn * layers / cfg.n_layers + head) / lay.tp
    compute = flops_mb / hw.flops_per_s

    # Tensor + sequence parallel (Korthikanti et al. 2022): per layer, forward and backward
    # each all-gather and reduce-scatter the sequence twice (attention, MLP); a recomputed
    # forward repeats its four. The vocab-parallel embedding and head add two of each per
    # micro-batch.
    tp_link, tp_conc = _group_link(hw, lay.tp > dpn, min(lay.tp, dpn))
    n_half = layers * (8 + (4 if lay.recompute == "full" else 0)) + 4
    tp_comm = n_half * _ring(tokens_mb * cfg.dim * job.act_bytes, lay.tp, tp_link, tp_conc, half=True)
    # Loss parallel reduces the max, the sum of exponentials and the target logit over the
    # vocab shards, forward and backward: small messages, latency only.
    tp_comm += 6 * _ring(tokens_mb * 4, lay.tp, tp_link, tp_conc)

    # Pipeline: activations forward and their gradients back, per micro-batch.
    p2p = 0.0
    if lay.pp > 1:
        crosses = job.devices > dpn
        link = hw.inter if crosses else hw.intra
        conc = min(dpn, lay.tp * lay.dp) if crosses else 1
        p2p = 2 * (link.alpha_s + tokens_mb * cfg.dim * job.act_bytes / lay.tp * link.beta * conc)
    per_mb = compute + tp_comm + p2p
    pipeline = (lay.n_micro + lay.pp - 1) * per_mb
    bubble = (lay.pp - 1) * per_mb
    backward_window = (2 / 3) * compute if hw.overlap else 0.0

    # Data parallel.
    params = stage_params(cfg, lay.pp, lay.tp)
    k = dp_members_per_node(lay.tp, lay.dp, dpn)
    dp_link, dp_conc = _group_link(hw, lay.dp > k, k)
    dp_comm = 0.0
    if lay.dp_kind == "ddp":
        t = _ring(grad_sync_bytes(job, lay, params), lay.dp, dp_link, dp_conc)
        if lay.comm.startswith("diloco"):
            t /= job.diloco_h
        manual = lay.comm in ("int8", "diloco", "diloco-int8")
        dp_comm = t if manual else max(0.0, t - backward_window)
    elif lay.dp_kind in ("fsdp", "hsdp"):
        shard = lay.dp_shard
        s_link, s_conc = (hw.intra, 1) if lay.dp_kind == "hsdp" else (dp_link, dp_conc)
        # suanli shards each transformer block and the root as its own FSDP unit: one
        # collective (one latency) per unit, the bytes split among them.
        units = layers + 1
        latency = (shard - 1) * s_link.alpha_s * (units - 1)
        rs = _ring(grad_sync_bytes(job, lay, params), shard, s_link, s_conc, half=True) + latency
        gathers = 2 * lay.n_micro if lay.pp == 1 else lay.n_micro
        ag = gathers * (_ring(params * job.act_bytes, shard, s_link, s_conc, half=True) + latency)
        ar = 0.0
        if lay.dp_kind == "hsdp":   # torch's replicate all-reduce of the shard, fp32
            # one rank per node in each replicate ring, every device of the node in one at once
            ar = _ring(params / shard * 4, lay.dp // shard, hw.inter, dpn)
        hidden = lay.n_micro * compute if hw.overlap else 0.0
        dp_comm = max(0.0, ag - hidden) + max(0.0, rs + ar - backward_window)
    held = params / lay.dp_shard if lay.dp_kind in ("fsdp", "hsdp") else params
    optimizer = held * hw.optimizer_s_per_param
    step = pipeline + dp_comm + optimizer
    return {"compute": lay.n_micro * compute, "tp_comm": lay.n_micro * tp_comm, "pp_comm": lay.n_micro * p2p,
            "bubble": bubble, "dp_comm": dp_comm, "optimizer": optimizer, "step": step}


# ---------------------------------------------------------------- plan


@dataclass
class Prediction:
    layout: Layout
    memory: dict
    time: dict
    tokens_per_s: float
    mfu: float | None
    fits: bool

    def as_dict(self) -> dict:
        return {"layout": asdict(self.layout), "label": self.layout.label(), "memory_gib": {
            k: v / GiB for k, v in self.memory.items()}, "time_s": self.time, "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu, "fits": self.fits}


def predict(job: Job, lay: Layout, hw: Hardware) -> Prediction:
    from suanli.bench.flops import model_flops_per_token

    mem = memory(job, lay)
    t = step_time(job, lay, hw)
    tps = job.global_batch * job.seq_len / t["step"]
    mfu = (tps / job.devices * model_flops_per_token(job.model, job.seq_len) / hw.peak_flops
           if hw.peak_flops else None)
    return Prediction(lay, mem, t, tps, mfu, mem["total"] <= USABLE_MEMORY * hw.memory_bytes)


def plan(job: Job, hw: Hardware, include_algorithmic: bool = True) -> list[Prediction]:
    """Every layout that fits, fastest first. `include_algorithmic=False` drops the options that
    change the optimization (PowerSGD, DiLoCo), leaving those that only change the wire format."""
    _check_job(job, hw)
    out = []
    for lay in enumerate_layouts(job, hw.devices_per_node):
        if not include_algorithmic and lay.comm in ("powersgd", "diloco", "diloco-int8"):
            continue
        pred = predict(job, lay, hw)
        if pred.fits:
            out.append(pred)
    out.sort(key=lambda p: (p.time["step"], p.memory["total"]))
    return _drop_useless_compression(out)


SIMPLICITY = ("fp32", "bf16", "int8", "powersgd", "diloco", "diloco-int8")


def _drop_useless_compression(ranked: list[Prediction]) -> list[Prediction]:
    """Keep a compressed option only where it beats every simpler option for the same layout
    by more than 1%: when communication is hidden anyway, fp32 is the better choice."""
    best: dict[tuple, float] = {}
    keep = set()
    for p in sorted(ranked, key=lambda p: SIMPLICITY.index(p.layout.comm)):
        key = (p.layout.tp, p.layout.pp, p.layout.dp, p.layout.dp_kind, p.layout.micro_batch, p.layout.recompute)
        if key not in best or p.time["step"] < 0.99 * best[key]:
            best[key] = min(best.get(key, math.inf), p.time["step"])
            keep.add(id(p))
    return [p for p in ranked if id(p) in keep]


def _check_job(job: Job, hw: Hardware) -> None:
    if job.devices < 1:
        raise ValueError(f"--devices: must be >= 1, got {job.devices}")
    if hw.devices_per_node < 1:
        raise ValueError(f"--devices-per-node: must be >= 1, got {hw.devices_per_node}")
    if job.devices > hw.devices_per_node and job.devices % hw.devices_per_node:
        raise ValueError(f"--devices: {job.devices} is not a whole number of nodes of --devices-per-node "
                         f"{hw.devices_per_node}")
    if job.seq_len < 1 or job.seq_len > job.model.max_seq_len:
        raise ValueError(f"--seq-len: {job.seq_len} must be in 1..{job.model.max_seq_len} (model.max_seq_len)")
    if job.global_batch < 1:
        raise ValueError(f"--global-batch: must be >= 1, got {job.global_batch}")
    if job.dtype not in ("bf16", "fp32"):
        raise ValueError(f"--dtype: '{job.dtype}' is not one of bf16, fp32")


def make_job(model: str, devices: int, seq_len: int, global_batch: int, dtype: str = "bf16",
             powersgd_rank: int = 4, diloco_h: int = 50) -> Job:
    try:
        cfg = preset(model)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    return Job(cfg, devices, seq_len, global_batch, dtype, powersgd_rank, diloco_h)


def to_toml(job: Job, pred: Prediction, model_name: str) -> str:
    lay = pred.layout
    comm = {"fp32": 'grad = "fp32"', "bf16": 'grad = "bf16"', "int8": 'grad = "int8"',
            "powersgd": f'grad = "powersgd"\npowersgd_rank = {job.powersgd_rank}',
            "diloco": f"diloco_inner_steps = {job.diloco_h}",
            "diloco-int8": f'diloco_inner_steps = {job.diloco_h}\ndiloco_compress = "int8"'}[lay.comm]
    return "\n".join([
        "[model]", f'preset = "{model_name}"', "",
        "[train]", f"seq_len = {job.seq_len}", f"global_batch = {job.global_batch}",
        f"micro_batch = {lay.micro_batch}", f'dtype = "{job.dtype}"', "",
        "[parallel]", f"tp = {lay.tp}", f"pp = {lay.pp}", f"dp_replicate = {lay.dp_replicate}",
        f"dp_shard = {lay.dp_shard if lay.dp_kind in ('fsdp', 'hsdp') else 1}", 'pp_schedule = "1f1b"',
        f'activation_checkpoint = "{lay.recompute}"', "",
        "[comm]", comm, ""])


__all__ = ["Link", "Topology", "read_topology", "write_topology", "topology_from_dict", "probe_topology",
           "fit_alpha_beta", "Hardware", "hardware", "Layout", "Job", "make_job", "enumerate_layouts", "memory",
           "step_time", "predict", "plan", "to_toml", "DEVICE_MEMORY_GIB", "Prediction"]
