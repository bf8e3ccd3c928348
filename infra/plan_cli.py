"""`suanli plan`: rank parallel layouts and communication options for a model on a fleet
(infra/planner.py holds the model; this file is only the command line)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="rank tp/pp/dp layouts and comm options by predicted step time")
    p.add_argument("--model", required=True, help="model preset: tiny, small, 125m, 1b, 7b, 13b, 70b")
    p.add_argument("--devices", type=int, required=True, help="total devices in the job")
    p.add_argument("--device-type", required=True,
                   help='a device the HAL peak table knows, by name or label: h100, h200, a100, h20, l40s, '
                        'mi300x, "MTT S4000", Ascend910A')
    p.add_argument("--intra-gbps", type=float, default=None,
                   help="intra-node bandwidth per device, Gbit/s per direction (H100 NVLink: 3600)")
    p.add_argument("--inter-gbps", type=float, default=None,
                   help="inter-node bandwidth per node (all NICs together), Gbit/s")
    p.add_argument("--devices-per-node", type=int, default=None, help="default: the topology file's, else 8")
    p.add_argument("--topology", default=None, help="topology JSON from `suanli bench comm --topology-out`")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=512, help="sequences per optimizer step")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--achievable", type=float, default=None,
                   help="fraction of peak FLOP/s compute reaches (default 0.5; see infra/planner.py)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak per device, overrides the table")
    p.add_argument("--memory-gib", type=float, default=None, help="device memory, overrides the table")
    p.add_argument("--overlap-efficiency", type=float, default=None,
                   help="share of overlappable DDP/FSDP communication the backend hides behind compute, 0..1 "
                        "(default: the topology file's measurement, else 1.0 for accelerators)")
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--diloco-h", type=int, default=50, help="DiLoCo inner steps assumed")
    p.add_argument("--no-algorithmic", action="store_true",
                   help="leave out options that change the optimization (PowerSGD, DiLoCo)")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    from suanli.infra.planner import DEFAULT_ACHIEVABLE, hardware, make_job, plan, read_topology, to_toml

    if args.top < 1:
        raise ValueError(f"--top: must be >= 1, got {args.top}")
    topo = read_topology(args.topology) if args.topology else None
    dpn = args.devices_per_node or (topo.devices_per_node if topo is not None else 8)
    job = make_job(args.model, args.devices, args.seq_len, args.global_batch, args.dtype, args.powersgd_rank,
                   args.diloco_h)
    hw = hardware(args.device_type, dpn, args.intra_gbps, args.inter_gbps, topo, args.dtype,
                  args.achievable or DEFAULT_ACHIEVABLE, args.peak_tflops, args.memory_gib,
                  overlap_efficiency=args.overlap_efficiency)
    ranked = plan(job, hw, include_algorithmic=not args.no_algorithmic)
    if not ranked:
        raise ValueError(f"--model {args.model}: no layout fits {args.devices} x {hw.name} "
                         f"({hw.memory_bytes / (1 << 30):.0f} GiB); add devices, shorten --seq-len or lower "
                         f"--global-batch")
    if args.json:
        print(json.dumps({"hardware": hw.name, "devices": args.devices, "devices_per_node": dpn,
                          "ranked": [p.as_dict() for p in ranked[:args.top]],
                          "toml": to_toml(job, ranked[0], args.model)}, indent=2))
        return 0
    print(format_plan(job, hw, ranked[:args.top], len(ranked), args.model))
    return 0


def format_plan(job, hw, rows, n_fit: int, model_name: str) -> str:
    from suanli.infra.planner import to_toml

    head = (f"{model_name} on {job.devices} x {hw.name} ({hw.devices_per_node}/node; intra "
            f"{hw.intra.bandwidth_gbps:g} Gb/s, inter {hw.inter.bandwidth_gbps:g} Gb/s per node), seq {job.seq_len}, "
            f"global batch {job.global_batch}, {job.dtype}; {n_fit} layouts fit, fastest first")
    cols = f"{'#':>3} {'layout':<44} {'mem GiB':>8} {'compute':>8} {'bubble':>7} {'tp comm':>7} {'pp comm':>7} " \
           f"{'dp comm':>8} {'other':>6} {'step s':>8} {'tok/s':>10} {'MFU':>6}"
    lines = [head, cols]
    for i, p in enumerate(rows, 1):
        t = p.time
        mfu = f"{100 * p.mfu:.1f}%" if p.mfu is not None else "-"
        lines.append(f"{i:>3} {p.layout.label():<44} {p.memory['total'] / (1 << 30):>8.1f} {t['compute']:>8.3f} "
                     f"{t['bubble']:>7.3f} {t['tp_comm']:>7.3f} {t['pp_comm']:>7.3f} {t['dp_comm']:>8.3f} "
                     f"{t['step_comm'] + t['host'] + t['codec']:>6.3f} "
                     f"{t['step']:>8.3f} {p.tokens_per_s:>10,.0f} {mfu:>6}")
    lines += ["", "Seconds per optimizer step; compute, tp/pp comm summed over micro-batches, bubble = idle pipeline "
              f"time, dp comm = the part not hidden behind compute (overlap efficiency {hw.overlap_efficiency:g}), "
              "other = loss and gradient-norm reductions + the parallel wrappers' host time + the int8 codec's work. Every collective is "
              "counted and charged alpha + bytes/bandwidth (infra/planner.py: collectives). powersgd/diloco "
              "change the optimization: check the loss curve.",
              "", "# suggested config (suanli train CONFIG.toml --nproc ...)", to_toml(job, rows[0], model_name)]
    return "\n".join(lines)
