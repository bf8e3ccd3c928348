"""`suanli bench ...`: measurement commands. Each sub-command is one row of BENCH_COMMANDS
(its arguments and its action); the work lives in the module the row names."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import fields
from pathlib import Path


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _emit(result, as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2) if as_json else text, flush=True)


# ---- peak ----
def add_peak(p) -> None:
    p.add_argument("--dtype", default="fp32,bf16", type=_csv, help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--quick", action="store_true", help="fewer sizes and trials")
    p.add_argument("--json", action="store_true")


def run_peak(args) -> int:
    from suanli.bench.peak import format_peak_rows, peak_report

    rows = peak_report(args.dtype, quick=args.quick)
    _emit(rows, args.json, format_peak_rows(rows))
    return 0


# ---- mfu ----
def add_layout_args(p) -> None:
    from suanli.bench.mfu_run import MfuSpec

    d = MfuSpec()
    p.add_argument("--model", default=d.model, help="model preset (tiny, small, 125m, ...)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--micro-batches", type=int, default=d.micro_batches,
                   help="micro-batches per replica per step (0: 1, or 2*pp with pipelining)")
    p.add_argument("--tp", type=int, default=d.tp)
    p.add_argument("--pp", type=int, default=d.pp)
    p.add_argument("--dp", type=int, default=d.dp)
    p.add_argument("--dp-mode", default=d.dp_mode, choices=["fsdp", "ddp"])
    p.add_argument("--schedule", default=d.schedule, choices=["gpipe", "1f1b", "interleaved-1f1b", "zbv"])
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16"])
    p.add_argument("--activation-checkpoint", default=d.activation_checkpoint, choices=["none", "full", "selective"])
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    p.add_argument("--profile-steps", type=int, default=d.profile_steps,
                   help="extra profiled steps for the time breakdown (0: skip)")
    p.add_argument("--peak", default=d.peak, choices=["table", "measured"],
                   help="table: the HAL's datasheet figure; measured: GEMM probe on every rank, before and "
                        "after training")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="your own peak TFLOP/s per device (wins)")


def spec_from_args(args):
    from suanli.bench.mfu_run import MfuSpec

    return MfuSpec(**{f.name: getattr(args, f.name) for f in fields(MfuSpec) if hasattr(args, f.name)})


def add_mfu(p) -> None:
    add_layout_args(p)
    p.add_argument("--sweep", action="store_true", help="run a grid of layouts (see --grid)")
    p.add_argument("--grid", default=None,
                   help='sweep grid, e.g. "tp=1,2 pp=1,2 dp=1,2 micro_batch=2,4" (default: tp, pp, dp in 1,2)')
    p.add_argument("--max-procs", type=int, default=None, help="largest process count in a sweep")
    p.add_argument("--out", default=None, help="sweep output directory (default bench/results/<date>-<device>)")
    p.add_argument("--json", action="store_true")


def run_mfu_cmd(args) -> int:
    from suanli.bench.mfu_run import format_mfu, run_mfu

    spec = spec_from_args(args)
    if args.sweep:
        from suanli.bench.sweep import run_sweep_to

        summary = run_sweep_to(spec, args.grid, args.max_procs, args.out, quiet=args.json)
        text = summary.pop("text")
        _emit(summary, args.json, text)
        return 0
    result = run_mfu(spec)
    _emit(result, args.json, format_mfu(result))
    return 0


# ---- comm ----
def add_comm(p) -> None:
    p.add_argument("--nproc", type=int, default=2, help="processes (one per device)")
    p.add_argument("--ops", "--op", dest="ops", default=["all_reduce"], type=_csv,
                   help="comma-separated: all_reduce,all_gather,reduce_scatter,all_to_all,broadcast,p2p")
    p.add_argument("--sizes", default="1K,64K,1M,16M", type=_csv, help="message sizes in bytes (K, M, G suffixes)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed iterations per size")
    p.add_argument("--group-size", type=int, default=0,
                   help="measure inside blocks of this many consecutive ranks, all blocks at once (0: whole world)")
    p.add_argument("--topology-out", default="", metavar="FILE",
                   help="also probe the link classes and write the topology file `suanli plan --topology` reads")
    p.add_argument("--json", action="store_true")


def run_comm_cmd(args) -> int:
    from suanli.bench.comm import BUS_FACTOR, CommSpec, format_comm, parse_size, run_comm

    bad = [op for op in args.ops if op not in BUS_FACTOR]
    if bad:
        raise SystemExit(f"suanli bench comm --ops: {', '.join(bad)} not among {', '.join(BUS_FACTOR)}")
    sizes = [parse_size(s) for s in args.sizes]
    results = []
    for i, op in enumerate(args.ops):
        # The topology probe runs once, with the last op's processes.
        topo = args.topology_out if i == len(args.ops) - 1 else ""
        spec = CommSpec(op=op, sizes=sizes, min_time_s=args.min_time, group_size=args.group_size, topology_out=topo)
        results.append(run_comm(spec, args.nproc))
    _emit(results[0] if len(results) == 1 else results, args.json, "\n\n".join(format_comm(r) for r in results))
    return 0


# ---- overhead ----
def add_overhead(p) -> None:
    p.add_argument("--models", default="tiny,small", type=_csv)
    p.add_argument("--layouts", default="single,ddp,fsdp", type=_csv, help="single, ddp (dp=2), fsdp (dp=2)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global sequences per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="threads per rank (default 1: steady on a shared machine; 0: cores / processes)")
    p.add_argument("--ablate", default="", help="investigation: comma-separated trainer duties to switch off on the "
                   "suanli side, run as extra rows (loss-allreduce, logging)")
    p.add_argument("--write", default=None, metavar="FILE.md", help="also write the markdown result file")
    p.add_argument("--json", action="store_true")


def run_overhead_cmd(args) -> int:
    from suanli.bench.overhead import OverheadSpec, format_overhead, run_overhead, write_overhead_report

    variants = [""] + ([args.ablate] if args.ablate else [])
    specs = [OverheadSpec(model=m, layout=lay, seq_len=args.seq_len, batch=args.batch, steps=args.steps,
                          warmup=args.warmup, threads=args.threads, ablate=v)
             for m in args.models for lay in args.layouts for v in variants]
    from suanli.bench.report import machine_info

    machine = machine_info()
    results = run_overhead(specs, progress=not args.json)
    if args.write:
        write_overhead_report(results, Path(args.write), " ".join(["suanli", "bench"] + sys.argv[2:]), machine)
    _emit(results, args.json, format_overhead(results))
    return 0


# ---- suite ----
def add_suite(p) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, small grid (minutes on a laptop)")
    p.add_argument("--model", default=None, help="model preset for the sweep (default tiny quick, small otherwise)")
    p.add_argument("--max-procs", type=int, default=None)
    p.add_argument("--out", default="bench/results", help="parent of the dated report directory")


def run_suite_cmd(args) -> int:
    from suanli.bench.suite import run_suite

    out = run_suite(quick=args.quick, model=args.model, max_procs=args.max_procs, root=Path(args.out))
    print(f"report: {out / 'report.md'}")
    return 0


# ---- commands whose module owns its arguments and action ----
def _lazy(target: str):
    """A function that imports "module:function" when called: the row names the owner of
    the command's arguments and action without this file importing it up front."""
    def call(*args):
        mod, fn = target.split(":")
        return getattr(importlib.import_module(mod), fn)(*args)

    return call


# name -> (help, add arguments, action)
BENCH_COMMANDS = {
    "peak": ("measured dense GEMM peak next to the HAL table's figure", add_peak, run_peak),
    "mfu": ("MFU / HFU of real suanli training steps (one layout or a --sweep)", add_mfu, run_mfu_cmd),
    "comm": ("collective bus bandwidth, nccl-tests style (algbw, busbw)", add_comm, run_comm_cmd),
    "overhead": ("suanli vs the same model trained by plain PyTorch, interleaved", add_overhead, run_overhead_cmd),
    "lowbw": ("low-bandwidth gradient options over a shaped link", _lazy("suanli.bench.lowbw:add_arguments"),
              _lazy("suanli.bench.lowbw:run_cli")),
    "checkpoint": ("what an async checkpoint costs the training loop",
                   _lazy("suanli.bench.checkpoint:add_checkpoint_args"),
                   _lazy("suanli.bench.checkpoint:run_checkpoint_cmd")),
    "recovery": ("fault -> detection -> resumed step: suanli vs torchrun vs Ray Train, same job and faults",
                 _lazy("suanli.bench.recovery:add_recovery_args"), _lazy("suanli.bench.recovery:run_recovery_cmd")),
    "suite": ("peak + comm + MFU sweep into a dated report directory", add_suite, run_suite_cmd),
}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure peak FLOPS, MFU, collectives, recovery")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, (help_text, add_args, action) in BENCH_COMMANDS.items():
        sp = bsub.add_parser(name, help=help_text)
        add_args(sp)
        sp.set_defaults(func=action)
