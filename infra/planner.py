"""Bandwidth-aware parallel planner: which tp × pp × dp × micro-batch × recompute × comm
option to run, predicted from a memory model and an alpha-beta time model.

Links, the topology file and the cost of one collective: infra/plan_comm.py.

Communication is counted, not lumped: `collectives(job, layout)` lists every collective one
step issues on the heaviest stage's device (kind, group, bytes, calls per step), as torch
2.x issues them for suanli's layouts (bench/plan_validate.py counts them on real gloo
processes and shows predicted against counted), and each call costs the alpha-beta time of
its kind over its group's link (per-kind figures from the topology file when it has them).
A ring that crosses nodes is limited by its inter-node hop, whose bandwidth is the node's
divided by the rings crossing at once (devices per node / ring members per node).

  compute per micro-batch  = hardware FLOPs (bench/flops.py, recompute included)
                             / (peak FLOP/s × achievable fraction)
                             + the parallel wrappers' host time per layer (TP's DTensor
                             dispatch, FSDP's copy-in/out; 0 on accelerators, whose host runs
                             ahead of the kernels; measured on CPU, where the host is the device)
  pipeline (1F1B)          = (m + pp - 1) × (compute + blocking TP and p2p collectives) per
                             micro-batch
  optimizer                = clip + AdamW over the parameters this device holds (memory-bound)
  data-parallel sync       = the DDP buckets / FSDP gathers and reduce-scatters; the part torch
                             can overlap (DDP buckets and FSDP reduce-scatters with backward,
                             FSDP prefetched gathers with compute) is hidden up to the overlap
                             window × the backend's overlap efficiency (a property of the
                             device class or measured into the topology file, never of a
                             layout); suanli's manual path (int8, DiLoCo) is fully exposed
  step-level collectives   = the loss reduction and the gradient-norm reductions of clipping
  int8 codec               = quantize/dequantize work of the manual int8 path, per element
  oversubscribed CPU host  = more processes than cores (Hardware.cores_per_node; validation
                             only): waits, the bubble and collective latency, go to the other
                             processes (wait_reclaimed); compute and bytes do not
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

import math
from dataclasses import asdict, dataclass, field

from suanli.infra.model import ModelConfig, preset
from suanli.infra.plan_comm import (KINDS, Link, Topology, fit_alpha_beta, probe_in_step, probe_topology,  # noqa: F401
                                    read_topology, topology_from_dict, write_topology)

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


# ---------------------------------------------------------------- hardware


@dataclass
class Hardware:
    name: str
    flops_per_s: float          # achievable dense FLOP/s per device (peak × fraction)
    memory_bytes: float
    devices_per_node: int
    intra: Link
    inter: Link
    # Share of an overlappable collective the backend really hides behind compute: GPUs run
    # collectives on their own engines/SMs (1.0 unless the topology file measured less); gloo
    # runs on the CPU cores that also compute, so when every core computes nothing hides
    # (bench/plan_validate.py uses 0; the probe's micro-benchmark figure is too noisy).
    overlap_efficiency: float = 1.0
    peak_flops: float | None = None
    # Clip + AdamW per parameter held: memory-bound, it reads weights, grads and both moments
    # and writes three of them, ~28 bytes, plus the norm's read of the grads (~32 B in all);
    # at ~2 TB/s of HBM that is 1.6e-11 s. The CPU validation measures its own.
    optimizer_s_per_param: float = 32 / 2e12
    kinds: dict = field(default_factory=dict)   # link class -> collective kind -> measured Link
    # Host time the parallel wrappers add per layer and micro-batch ({"tp": DTensor dispatch and
    # redistribution bookkeeping, "fsdp": gather copy-in/out and hooks}). An accelerator's host
    # runs ahead of its kernels and hides it (none here); on CPU the host is the device, and
    # bench/plan_validate.py measures it.
    host_s_per_layer: dict = field(default_factory=dict)
    # suanli's int8 path's own work per gradient element (FlatReducer: quantize, error feedback,
    # dequantize, sum, requantize: ~25 bytes of memory traffic at ~2 TB/s of HBM). CPU: measured.
    codec_s_per_param: float = 25 / 2e12
    # CPU development hosts only: the cores a node's devices (processes) share; 0 = each device
    # computes on its own silicon. With more processes than cores, a rank that waits (in the
    # pipeline bubble, or on a peer in a collective) hands its core share to ranks with work.
    cores_per_node: int = 0

    def link(self, span_nodes: bool, kind: str) -> Link:
        """The link a collective of `kind` runs at: measured per kind where the topology has it
        (all-to-all falls back to reduce-scatter, which moves the same bytes), else the class's."""
        cls = "inter_node" if span_nodes else "intra_node"
        per_kind = self.kinds.get(cls, {})
        return per_kind.get(kind) or per_kind.get("reduce_scatter" if kind == "all_to_all" else "") or \
            (self.inter if span_nodes else self.intra)


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
             intra_latency_us: float = 5.0, inter_latency_us: float = 20.0,
             overlap_efficiency: float | None = None) -> Hardware:
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
    kinds: dict = {}
    overlap = 1.0
    if topology is not None:
        # A flag that overrides a class's bandwidth also retires that class's per-kind figures.
        kinds = {c: k for c, k in topology.kinds.items()
                 if (c == "intra_node" and intra_gbps is None) or (c == "inter_node" and inter_gbps is None)}
        overlap = topology.overlap_efficiency if topology.overlap_efficiency is not None else 1.0
        intra = topology.intra if intra_gbps is None else Link(topology.intra.alpha_s, intra_gbps)
        base_inter = topology.inter or Link(inter_latency_us * 1e-6, inter_gbps or 0.0)
        inter = base_inter if inter_gbps is None else Link(base_inter.alpha_s, inter_gbps)
    else:
        if intra_gbps is None or inter_gbps is None:
            raise ValueError("--intra-gbps and --inter-gbps: both are needed without --topology FILE")
        intra, inter = Link(intra_latency_us * 1e-6, intra_gbps), Link(inter_latency_us * 1e-6, inter_gbps)
    if overlap_efficiency is not None:
        if not 0 <= overlap_efficiency <= 1:
            raise ValueError(f"--overlap-efficiency: must be in [0, 1], got {overlap_efficiency}")
        overlap = overlap_efficiency
    for name, link in (("--intra-gbps", intra), ("--inter-gbps", inter)):
        if not link.bandwidth_gbps > 0:
            raise ValueError(f"{name}: must be > 0, got {link.bandwidth_gbps}")
    return Hardware(label, peak * achievable, mem * GiB, devices_per_node, intra, inter, overlap, peak,
                    kinds=kinds)


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


# ---------------------------------------------------------------- communication inventory


DDP_FIRST_BUCKET, DDP_BUCKET = 1 << 20, 25 << 20   # torch DDP's bucket caps (bytes of fp32 grads)


@dataclass(frozen=True)
class Collective:
    """One kind of collective a step issues on the heaviest stage's device."""
    what: str        # what it carries
    kind: str        # all_reduce | all_gather | reduce_scatter | all_to_all | p2p
    group: str       # tp | pp | dp | shard | replicate | world
    part: str        # which line of the breakdown it belongs to: tp | pp | dp | step
    phase: str       # micro_batch (blocking, in every micro-batch) | backward (overlappable with
                     # backward) | prefetch (overlappable with compute) | exposed (after backward)
    nbytes: float    # S per call (all-reduce buffer, all-gather output, reduce-scatter input)
    calls: float     # per optimizer step (fractional for DiLoCo's every-H-steps sync)


def ddp_buckets(params: float) -> int:
    return 1 + math.ceil(max(0.0, params * 4 - DDP_FIRST_BUCKET) / DDP_BUCKET)


def collectives(job: Job, lay: Layout) -> list[Collective]:
    """Every collective one optimizer step issues on the heaviest pipeline stage's device (the
    last: it holds the output head), as torch 2.x runs suanli's layouts. Counted against real
    gloo runs by bench/plan_validate.py and tests/test_planner.py."""
    from suanli.infra.pipeline import split_layers

    cfg, m = job.model, lay.n_micro
    L = max(split_layers(cfg.n_layers, lay.pp, []))
    tokens = job.seq_len * lay.micro_batch
    act = tokens * cfg.dim * job.act_bytes
    params = stage_params(cfg, lay.pp, lay.tp)
    out: list[Collective] = []
    if lay.tp > 1:
        # Sequence parallel (Korthikanti et al. 2022): per block, forward all-gathers the
        # sequence before attention and MLP and reduce-scatters after each; backward mirrors
        # that; a fully recomputed forward repeats its own. The vocab-parallel embedding (first
        # stage) and output head (last) add one of each per micro-batch.
        ends = 1 + (1 if lay.pp == 1 else 0)
        sp = 4 * L + (2 * L if lay.recompute == "full" else 0) + ends
        out += [Collective("sequence-parallel gather", "all_gather", "tp", "tp", "micro_batch", act, sp * m),
                Collective("sequence-parallel scatter", "reduce_scatter", "tp", "tp", "micro_batch", act, sp * m),
                # loss parallel: max, sum of exponentials and target logit over the vocab shards
                Collective("loss-parallel reductions", "all_reduce", "tp", "tp", "micro_batch", tokens * 4, 3 * m),
                # the norm of each column-parallel weight's gradient (wq, wk, wv, w1, w3) is
                # reduced on its own when clipping
                Collective("clip: sharded grad norms", "all_reduce", "tp", "step", "exposed", 4, 5 * L)]
    if lay.pp > 1:
        out += [Collective("stage activations / grads", "p2p", "pp", "pp", "micro_batch", act / lay.tp, 2 * m),
                Collective("clip: norm across stages", "all_reduce", "pp", "step", "exposed", 4, 1)]
    if lay.dp_kind == "ddp":
        grad = grad_sync_bytes(job, lay, params)
        b = ddp_buckets(params)
        if lay.comm in ("fp32", "bf16"):
            out.append(Collective("DDP gradient buckets", "all_reduce", "dp", "dp", "backward", grad / b, b))
        elif lay.comm == "powersgd":   # torch's hook: rank-1 tensors, P and Q per bucket
            out.append(Collective("PowerSGD P/Q per bucket", "all_reduce", "dp", "dp", "backward", grad / (3 * b),
                                  3 * b))
        elif lay.comm == "diloco":
            out.append(Collective("DiLoCo pseudo-gradient", "all_reduce", "dp", "dp", "exposed", grad,
                                  1 / job.diloco_h))
        else:   # suanli's int8 reduce-scatter (all-to-all) + all-gather, payload and scales each
            every = 1 / job.diloco_h if lay.comm == "diloco-int8" else 1
            out += [Collective("int8 reduce-scatter", "all_to_all", "dp", "dp", "exposed", grad / 2, 2 * every),
                    Collective("int8 all-gather", "all_gather", "dp", "dp", "exposed", grad / 2, 2 * every)]
    elif lay.dp_kind in ("fsdp", "hsdp"):
        # One FSDP unit per block plus the root (embedding, head). Without PP each micro-batch
        # gathers every unit in forward and again in backward (resharded after forward); with
        # PP the stage keeps them gathered across micro-batches. Gradients are reduce-scattered
        # on the last micro-batch only (no sync before).
        units = L + 1
        gathers = 2 * m if lay.pp == 1 else 1
        out += [Collective("FSDP parameter gathers", "all_gather", "shard", "dp", "prefetch",
                           params * job.act_bytes / units, units * gathers),
                Collective("FSDP gradient reduce-scatter", "reduce_scatter", "shard", "dp", "backward",
                           grad_sync_bytes(job, lay, params) / units, units),
                Collective("clip: sharded grad norm", "all_reduce", "shard", "step", "exposed", 4, 1)]
        if lay.dp_kind == "hsdp":   # torch's replicate all-reduce of each unit's shard, fp32
            out.append(Collective("HSDP replica all-reduce", "all_reduce", "replicate", "dp", "backward",
                                  params / lay.dp_shard * 4 / units, units))
    if job.devices > 1:
        out.append(Collective("loss for the log", "all_reduce", "world", "step", "exposed", 4, 1))
    return out


def collective_counts(job: Job, lay: Layout) -> dict[str, float]:
    """Calls per step by kind, as bench/plan_validate.py counts them on a real run."""
    counts: dict[str, float] = {}
    for c in collectives(job, lay):
        counts[c.kind] = counts.get(c.kind, 0) + c.calls
    return counts


# ---------------------------------------------------------------- time


def _route(hw: Hardware, job: Job, lay: Layout, group: str) -> tuple[int, bool, int]:
    """(ranks, crosses nodes, rings sharing the slowest hop) of a collective's group. suanli's
    mesh puts tp innermost, then dp, then pp."""
    dpn = hw.devices_per_node
    k = dp_members_per_node(lay.tp, lay.dp, dpn)
    if group == "tp":
        n, per_node = lay.tp, min(lay.tp, dpn)
    elif group in ("dp", "shard"):
        n, per_node = (lay.dp_shard, k) if lay.dp_kind == "hsdp" and group == "shard" else (lay.dp, k)
    elif group == "replicate":
        return lay.dp // lay.dp_shard, True, dpn
    elif group == "pp":
        crosses = job.devices > dpn
        return 2, crosses, min(dpn, lay.tp * lay.dp) if crosses else 1
    else:
        n, per_node = job.devices, min(job.devices, dpn)
    span = n > per_node
    return n, span, max(1, dpn // per_node) if span else 1


def collective_time(hw: Hardware, job: Job, lay: Layout, c: Collective) -> float:
    """Seconds per step for all of `c`'s calls."""
    n, span, conc = _route(hw, job, lay, c.group)
    return c.calls * hw.link(span, c.kind).cost(c.kind, c.nbytes, n, conc, 1 - wait_reclaimed(hw, job))


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

    cfg, s, b, m = job.model, job.seq_len, lay.micro_batch, lay.n_micro
    # Per-device share of one micro-batch's work on the heaviest stage (the last: it has the head).
    head = 3 * 2 * cfg.dim * cfg.vocab_size   # the output head is never recomputed
    blocks_and_attn = hardware_flops_per_token(cfg, s, lay.recompute) - head
    layers = max(split_layers(cfg.n_layers, lay.pp, []))
    compute = s * b * (blocks_and_attn * layers / cfg.n_layers + head) / lay.tp / hw.flops_per_s
    host = layers * ((hw.host_s_per_layer.get("tp", 0.0) if lay.tp > 1 else 0.0)
                     + (hw.host_s_per_layer.get("fsdp", 0.0) if lay.dp_kind in ("fsdp", "hsdp") else 0.0))

    t = {"tp": 0.0, "pp": 0.0, "dp_backward": 0.0, "dp_prefetch": 0.0, "dp_exposed": 0.0, "step": 0.0}
    for c in collectives(job, lay):
        x = collective_time(hw, job, lay, c)
        key = f"dp_{c.phase}" if c.part == "dp" else c.part
        t[key] += x
    per_mb = compute + host + (t["tp"] + t["pp"]) / m
    bubble = (lay.pp - 1) * per_mb * (1 - wait_reclaimed(hw, job))
    pipeline = m * per_mb + bubble
    # What torch overlaps, hidden up to the window × how much of it this backend really hides:
    # DDP buckets and FSDP reduce-scatters behind the last micro-batch's backward, FSDP's
    # prefetched gathers behind all compute.
    eff = hw.overlap_efficiency
    dp_comm = (max(0.0, t["dp_backward"] - eff * (2 / 3) * compute)
               + max(0.0, t["dp_prefetch"] - eff * m * compute) + t["dp_exposed"])
    held = params_held(job, lay)
    optimizer = held * hw.optimizer_s_per_param
    codec = 0.0
    if lay.comm in ("int8", "diloco-int8"):   # the whole gradient is encoded, sharded or not
        codec = stage_params(cfg, lay.pp, lay.tp) * hw.codec_s_per_param / (
            job.diloco_h if lay.comm == "diloco-int8" else 1)
    step = pipeline + dp_comm + codec + t["step"] + optimizer
    return {"compute": m * compute, "host": m * host, "tp_comm": t["tp"], "pp_comm": t["pp"],
            "bubble": bubble,
            "dp_comm": dp_comm, "codec": codec, "step_comm": t["step"], "optimizer": optimizer, "step": step}


def wait_reclaimed(hw: Hardware, job: Job) -> float:
    """Share of a rank's waiting other ranks put to use. On a host with P processes time-sharing
    C < P cores (compute calibrated with all P computing), a rank idle in the pipeline bubble or
    blocked on a peer in a collective hands its core share to the P - 1 others; from P >= 2C on
    they can absorb all of it, and what is left of communication is its CPU work (the bytes).
    Measured on 2 cores: 4-process dp4 and pp2 x dp2 within 5% with this, +16% and +50% without.
    Accelerators (cores_per_node 0): nothing is reclaimed."""
    procs = min(hw.devices_per_node, job.devices)
    if not hw.cores_per_node or procs <= hw.cores_per_node:
        return 0.0
    return min(1.0, procs / hw.cores_per_node - 1)


def params_held(job: Job, lay: Layout) -> float:
    params = stage_params(job.model, lay.pp, lay.tp)
    return params / lay.dp_shard if lay.dp_kind in ("fsdp", "hsdp") else params


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
           "fit_alpha_beta", "probe_in_step", "KINDS", "Collective", "collectives", "collective_counts", "Hardware",
           "hardware", "Layout", "Job", "make_job", "enumerate_layouts", "memory",
           "step_time", "predict", "plan", "to_toml", "DEVICE_MEMORY_GIB", "Prediction"]
