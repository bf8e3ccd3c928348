"""Check the planner's time model against measured step times on this machine's CPUs.

    python -m suanli.bench.plan_validate [--json] [--out bench/results]

1. Calibrate: train the model in one process and take its achieved FLOP/s (hardware FLOPs
   per token × tokens ÷ median forward+backward time) as one CPU "device"'s compute rate,
   and its clip + optimizer time per parameter as the optimizer cost. For a layout
   of n processes, n such single-process runs go at once (no communication between them),
   so the rate is measured under the same CPU contention the layout will see — on a shared
   machine that is not cores/n, it depends on everything else running.
2. Probe the links: `probe_topology` on 2 gloo processes (loopback) fits alpha and bandwidth.
3. For each 2- and 4-process layout, predict the step time with infra/planner.py (no
   compute/communication overlap: on shared CPU cores they compete) and measure it with
   the same training loop.
A layout passes when |predicted − measured| ≤ 25% of measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOLERANCE = 0.25
BASE = ['model.preset="tiny"', "train.seq_len=128", "train.global_batch=16", "train.micro_batch=2",
        "train.warmup_steps=1", "data.synthetic_tokens=200000", "train.lr=1e-3"]


@dataclass
class Case:
    name: str
    nproc: int
    overrides: list[str] = field(default_factory=list)
    # planner layout fields
    tp: int = 1
    pp: int = 1
    dp_kind: str = "none"
    comm: str = "fp32"


CASES = [
    Case("dp2 ddp fp32", 2, ["parallel.dp_replicate=2"], dp_kind="ddp"),
    Case("dp2 ddp int8", 2, ["parallel.dp_replicate=2", 'comm.grad="int8"'], dp_kind="ddp", comm="int8"),
    Case("dp2 fsdp fp32", 2, [], dp_kind="fsdp"),
    Case("tp2", 2, ["parallel.tp=2"], tp=2),
    Case("pp2 1f1b", 2, ["parallel.pp=2"], pp=2),
    Case("pp2 dp2 fsdp", 4, ["parallel.pp=2"], pp=2, dp_kind="fsdp"),
    Case("dp4 ddp fp32", 4, ["parallel.dp_replicate=4"], dp_kind="ddp"),
]


def worker(spec: dict) -> None:
    """One rank: train with the harness, print the step times on rank 0."""
    import torch.distributed as dist

    import suanli
    from suanli.infra.config import load_config
    from suanli.infra.lowbw.harness import build, train

    if spec.get("solo"):
        # An independent one-process job beside its siblings: no shared rendezvous.
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        cfg = load_config(None, BASE + [f"train.steps={spec['steps']}"])
        records = train(build(cfg))
        print("RESULT " + json.dumps({"step_times": [r["step_time_s"] for r in records],
                                      "fwd_bwd": [r["fwd_bwd_s"] for r in records],
                                      "optimizer": [r["optimizer_s"] for r in records]}), flush=True)
        suanli.shutdown()
        return
    if spec.get("probe"):
        from suanli.infra.planner import probe_topology

        ctx = suanli.init(suanli.ParallelConfig(dp_replicate=int(os.environ["WORLD_SIZE"]), dp_shard=1))
        topo = probe_topology(ctx, sizes=(1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22), iters=10)
        if ctx.rank == 0:
            print("RESULT " + json.dumps(topo), flush=True)
    else:
        cfg = load_config(None, BASE + [f"train.steps={spec['steps']}"] + spec["overrides"])
        run = build(cfg)
        records = train(run)
        if run.ctx.rank == 0:
            print("RESULT " + json.dumps({"step_times": [r["step_time_s"] for r in records]}), flush=True)
    dist.barrier()
    suanli.shutdown()


def _launch(spec: dict, nproc: int, rank: int = 0) -> dict:
    from suanli.infra.launch import launch_local

    env = {"SUANLI_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    res = launch_local([sys.executable, "-m", "suanli.bench.plan_validate", "--worker", json.dumps(spec)], nproc,
                       capture=True, timeout_s=600, extra_env=env)
    if res.returncode != 0:
        tail = res.outputs[res.failed_rank or 0][-3000:]
        raise RuntimeError(f"plan_validate: rank {res.failed_rank} failed:\n{tail}")
    found = [json.loads(line[7:]) for out in res.outputs for line in out.splitlines() if line.startswith("RESULT ")]
    if not found:
        raise RuntimeError("plan_validate: worker printed no RESULT")
    return found if rank < 0 else found[rank]


def _calibrate(nproc: int, steps: int) -> tuple[float, float]:
    """Median single-process (forward+backward, clip+optimizer) seconds per step, with `nproc`
    independent copies running at once."""
    runs = _launch({"solo": True, "steps": steps}, nproc, rank=-1)
    fb = statistics.median(statistics.median(r["fwd_bwd"][2:]) for r in runs)
    opt = statistics.median(statistics.median(r["optimizer"][2:]) for r in runs)
    return fb, opt


def _median_step(nproc: int, overrides: list[str], steps: int) -> float:
    times = _launch({"overrides": overrides, "steps": steps}, nproc)["step_times"]
    return statistics.median(times[2:])  # the first steps pay one-off warm-up costs


def validate(steps: int = 8, cases: list[Case] | None = None, rounds: int = 3) -> dict:
    from suanli.bench.flops import hardware_flops_per_token
    from suanli.infra.config import load_config, model_config
    from suanli.infra.model import count_params
    from suanli.infra.planner import Hardware, Job, Layout, predict, topology_from_dict

    cases = cases or CASES
    cores = os.cpu_count() or 1
    cfg = load_config(None, BASE)
    mcfg = model_config(cfg)
    t = cfg.train
    topo = topology_from_dict(_launch({"probe": True}, 2))
    n_params = count_params(mcfg, exclude_embedding=False)

    rows = []
    for case in cases:
        # Calibrate right before each measurement, and alternate the two `rounds` times: on a
        # shared machine the CPU share drifts within minutes; medians damp what is left.
        singles, opts, measures = [], [], []
        for _ in range(rounds):
            fb, opt = _calibrate(case.nproc, steps)
            singles.append(fb)
            opts.append(opt)
            measures.append(_median_step(case.nproc, case.overrides, steps))
        single, measured = statistics.median(singles), statistics.median(measures)
        tokens = t.global_batch * t.seq_len
        rate = hardware_flops_per_token(mcfg, t.seq_len) * tokens / single
        hw = Hardware("cpu", rate, 1e15, case.nproc, topo.intra, topo.intra, overlap=False,
                      optimizer_s_per_param=statistics.median(opts) / n_params)
        job = Job(mcfg, case.nproc, t.seq_len, t.global_batch, "fp32")
        dp = case.nproc // (case.tp * case.pp)
        local = t.global_batch // dp
        lay = Layout(case.tp, case.pp, dp, case.dp_kind, dp if case.dp_kind == "fsdp" else 1, t.micro_batch,
                     local // t.micro_batch, "none", case.comm)
        pred = predict(job, lay, hw)
        err = (pred.time["step"] - measured) / measured
        rows.append({"layout": case.name, "nproc": case.nproc, "predicted_s": pred.time["step"],
                     "measured_s": measured, "error": err, "ok": abs(err) <= TOLERANCE,
                     "single_process_s": single, "calibrations_s": singles, "measurements_s": measures,
                     "breakdown": pred.time})
    return {"machine": {"cpu_count": cores, "load_avg": os.getloadavg()}, "model": "tiny",
            "seq_len": t.seq_len, "global_batch": t.global_batch, "micro_batch": t.micro_batch,
            "topology": topo.to_dict(), "tolerance": TOLERANCE, "rows": rows,
            "passed": sum(r["ok"] for r in rows), "total": len(rows)}


def format_report(r: dict) -> str:
    link = r["topology"]["links"]["intra_node"]
    lines = [f"# Planner validation on CPU ({r['machine']['cpu_count']} cores, load average "
             f"{' '.join(f'{x:.1f}' for x in r['machine']['load_avg'])})", "",
             f"Model {r['model']}, seq {r['seq_len']}, global batch {r['global_batch']}, micro-batch "
             f"{r['micro_batch']}, fp32, gloo. Link probe (loopback): alpha {link['alpha_s'] * 1e6:.0f} us, "
             f"{link['bandwidth_gbps']:.1f} Gbit/s. Compute rate calibrated before each layout by as many "
             f"independent 1-process runs as the layout has processes; calibration and measurement alternate "
             f"{len(r['rows'][0]['measurements_s']) if r['rows'] else 0} times, medians taken.",
             "", "| layout | procs | predicted s | measured s | error | within 25% |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['layout']} | {row['nproc']} | {row['predicted_s']:.3f} | {row['measured_s']:.3f} | "
                     f"{100 * row['error']:+.1f}% | {'yes' if row['ok'] else 'NO'} |")
    lines += ["", f"{r['passed']}/{r['total']} layouts within {100 * r['tolerance']:.0f}%."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m suanli.bench.plan_validate", description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the first 2 are not timed)")
    ap.add_argument("--rounds", type=int, default=3, help="calibrate/measure alternations per layout")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="directory for plan-validate-<date>.md/.json (e.g. bench/results)")
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    report = validate(args.steps, rounds=args.rounds)
    text = format_report(report)
    print(json.dumps(report, indent=2) if args.json else text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d")
        (out / f"plan-validate-{stamp}.md").write_text(text + "\n")
        (out / f"plan-validate-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] == report["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
