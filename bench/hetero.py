"""Benchmark (not a test): a heterogeneous job against each of its device groups alone, and
what crosses the bridge.

    python -m suanli.bench.hetero [--steps 6] [--slowdown 2] [--only NAME ...] [--out bench/results]

Two device groups of two ranks each: "cpu" and the emulated "cpu-emulated" slowed by
--slowdown. Scenarios:
  A alone / B alone           each group trains the whole model by itself (2 stages, pp inside the group)
  pipeline uniform/balanced   stage 0 on A (tp=2), stage 1 on B (dp=2): data parallelism stays inside a
                              vendor; only activations and their gradients cross (uniform or measured split)
  pipeline + bf16 / int8      the same, bridge traffic compressed
  cross-vendor DP (+ int8)    A and B each hold the whole model (tp=2), rows split by measured speed;
                              gradients are summed across vendors through the bridge every step
Per scenario: median step time (the slowest rank's, over the timed steps), tokens/s, bridge
bytes and seconds per step (summed over ranks; seconds are time a rank spent staging and
waiting on the bridge), gradient-bridge bytes, measured bubble (1 - compute / pipeline time,
mean over ranks) and the planner's predicted bubble, and the host's load average.

On a CPU host every "device" shares the host's cores: four ranks on a 2-core machine
compete, so the heterogeneous rows are CPU-bound in a way real accelerators are not. The
numbers show the mechanics (bytes, bridge time, bubble, the effect of balancing); the
report says what host they were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BASE = ["model.preset=\"tiny\"", "train.seq_len=128", "train.global_batch=16", "train.micro_batch=2",
        "train.warmup_steps=2", "data.synthetic_tokens=200000", "train.lr=1e-3", "hetero.emulated=true",
        "checkpoint.every_steps=0"]

A, B = "cpu", "cpu-emulated"


def _groups(*tables: str) -> str:
    return "hetero.groups=[" + ", ".join("{" + t + "}" for t in tables) + "]"


SCENARIOS: dict[str, dict] = {
    "A alone": {"sets": [_groups(f'device="{A}", ranks=[0,1], stages=[0,1]')]},
    "B alone": {"sets": [_groups(f'device="{B}", ranks=[0,1], stages=[0,1]')]},
    "pipeline uniform": {"sets": [_groups(f'device="{A}", ranks=[0,1], tp=2, stages=[0]',
                                          f'device="{B}", ranks=[2,3], stages=[1]')]},
    "pipeline balanced": {"sets": [_groups(f'device="{A}", ranks=[0,1], tp=2, stages=[0]',
                                           f'device="{B}", ranks=[2,3], stages=[1]'), 'hetero.balance="measure"']},
    "pipeline balanced + bf16": {"sets": [_groups(f'device="{A}", ranks=[0,1], tp=2, stages=[0]',
                                                  f'device="{B}", ranks=[2,3], stages=[1]'),
                                          'hetero.balance="measure"', 'hetero.bridge_compress="bf16"']},
    "pipeline balanced + int8": {"sets": [_groups(f'device="{A}", ranks=[0,1], tp=2, stages=[0]',
                                                  f'device="{B}", ranks=[2,3], stages=[1]'),
                                          'hetero.balance="measure"', 'hetero.bridge_compress="int8"']},
    "cross-vendor DP": {"sets": [_groups(f'device="{A}", ranks=[0,1], tp=2, stages=[0]',
                                         f'device="{B}", ranks=[2,3], tp=2, stages=[0]'), 'hetero.balance="measure"']},
    "cross-vendor DP + int8": {"sets": [_groups(f'device="{A}", ranks=[0,1], tp=2, stages=[0]',
                                                f'device="{B}", ranks=[2,3], tp=2, stages=[0]'),
                                        'hetero.balance="measure"', 'hetero.bridge_compress="int8"']},
}


# ---------------------------------------------------------------- one rank


def worker(spec: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor.parallel import loss_parallel

    from suanli.infra.config import load_config, model_config
    from suanli.infra.data import DistributedBatchSampler, TokenDataset, make_batch, synthetic_tokens
    from suanli.infra.hetero import build_hetero
    from suanli.infra.optim import build_lr_scheduler, build_optimizer

    cfg = load_config(None, BASE + spec["sets"])
    t = cfg.train
    ctx, pm = build_hetero(cfg)
    wire = calibrate(dist.get_world_size() - 1)
    params = list(pm.parameters())
    opt = build_optimizer(ctx.accelerator, params, t.lr, t.weight_decay)
    sched = build_lr_scheduler(opt, t.warmup_steps, t.steps, t.min_lr_ratio)
    mc = model_config(cfg)
    data = TokenDataset(synthetic_tokens(cfg.data.synthetic_tokens, mc.vocab_size, t.seed), t.seq_len, mc.vocab_size)
    sampler = DistributedBatchSampler(len(data), t.global_batch, ctx.dp_rank, ctx.dp_size, seed=t.seed)
    rows = []
    for i in range(spec["warmup"] + spec["steps"]):
        inputs, targets = make_batch(data, next(sampler))
        dist.barrier()
        with loss_parallel() if pm.tensor_parallel else contextlib.nullcontext():
            pm.pipeline.step(inputs, targets)
        pm.clip_grad_norm_(t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i >= spec["warmup"]:
            rows.append(pm.pipeline.last_stats.as_dict())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": ctx.rank, "device": ctx.accelerator.name, "stage": ctx.role.stage,
                                      "rows": rows})
    if ctx.rank == 0:
        print("RESULT " + json.dumps({"per_rank": gathered, "layers": pm.stage_layers,
                                      "speeds": {str(k): v for k, v in ctx.speeds.items()},
                                      "plan": ctx.plan.describe(), "wire": wire,
                                      "predicted": ctx.prediction.as_dict() if ctx.prediction else None}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def calibrate(peer: int) -> dict:
    """One-way latency and bandwidth of gloo point-to-point between rank 0 and `peer` (the
    bridge's transport), by ping-pong: turns a step's bridge bytes into an estimate of time
    on the wire, which the measured wait (that includes waiting for the peer) only bounds."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    if peer == 0 or rank not in (0, peer):
        return {}
    other = peer if rank == 0 else 0

    def rtt(nbytes: int, reps: int) -> float:
        buf = torch.zeros(max(1, nbytes // 4))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, other)
                dist.recv(buf, other)
            else:
                dist.recv(buf, other)
                dist.send(buf, other)
            times.append(time.perf_counter() - start)
        return min(times)

    rtt(4, 3)
    latency = rtt(4, 20) / 2
    big = 1 << 22
    bandwidth = big / max(rtt(big, 5) / 2 - latency, 1e-9)
    return {"latency_s": latency, "bandwidth_Bps": bandwidth}


# ---------------------------------------------------------------- the launcher


def summarize(name: str, res: dict, global_batch: int, seq_len: int) -> dict:
    ranks = res["per_rank"]
    n = len(ranks[0]["rows"])

    def per_step(key: str, sub: str | None = None, how=sum) -> float:
        vals = []
        for i in range(n):
            xs = [r["rows"][i][key] if sub is None else r["rows"][i][key].get(sub, 0) for r in ranks]
            vals.append(how(xs))
        return statistics.median(vals)

    step = per_step("step_s", how=max)
    wire = res.get("wire") or {}

    def wire_s(key: str) -> float | None:
        if not wire:
            return None
        return per_step(key, "bytes_sent") / wire["bandwidth_Bps"] + per_step(key, "messages") * wire["latency_s"]

    return {
        "scenario": name, "ranks": len(ranks), "devices": sorted({r["device"] for r in ranks}),
        "layers": res["layers"], "step_s": step, "tokens_per_s": global_batch * seq_len / step,
        "bubble_measured": per_step("bubble", how=lambda xs: sum(xs) / len(xs)),
        "bubble_predicted": (res["predicted"] or {}).get("bubble"),
        "predicted_from": (res["predicted"] or {}).get("unit"),
        "bridge_bytes": per_step("bridge", "bytes_sent"), "bridge_messages": per_step("bridge", "messages"),
        "bridge_stage_s": per_step("bridge", "stage_s"), "bridge_wait_s": per_step("bridge", "wait_s"),
        "bridge_wire_est_s": wire_s("bridge"),
        "grad_bridge_bytes": per_step("dp_bridge", "bytes_sent"), "grad_bridge_s": per_step("dp_bridge", "wait_s"),
        "grad_bridge_wire_est_s": wire_s("dp_bridge"), "wire": wire,
        "sync_s": per_step("sync_s", how=max), "speeds": res["speeds"],
    }


def run(names: list[str], steps: int, warmup: int, slowdown: float) -> list[dict]:
    from suanli.infra.config import load_config
    from suanli.infra.launch import launch_local

    cfg = load_config(None, BASE)
    out = []
    for name in names:
        sc = SCENARIOS[name]
        spec = {"sets": sc["sets"], "steps": steps, "warmup": warmup}
        nproc = 1 + max(r for g in load_config(None, BASE + sc["sets"]).hetero.groups for r in g["ranks"])
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        res = launch_local([sys.executable, "-m", "suanli.bench.hetero", "--worker", json.dumps(spec)], nproc,
                           capture=True, timeout_s=900,
                           extra_env={"OMP_NUM_THREADS": "1", "SUANLI_ACCELERATOR": "cpu",
                                      "SUANLI_EMULATED_SLOWDOWN": str(slowdown)})
        if res.returncode != 0:
            raise RuntimeError(f"scenario {name!r} failed on rank {res.failed_rank}:\n" +
                               "\n".join(o[-3000:] for o in res.outputs))
        line = next(ln for ln in res.outputs[0].splitlines() if ln.startswith("RESULT "))
        row = summarize(name, json.loads(line[7:]), cfg.train.global_batch, cfg.train.seq_len)
        row["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        row["wall_s"] = round(time.perf_counter() - start, 1)
        out.append(row)
        print(f"{name:28s} step {row['step_s'] * 1e3:7.0f} ms  layers {row['layers']}  bridge "
              f"{row['bridge_bytes'] / 1e6:6.2f} MB / stage {row['bridge_stage_s'] * 1e3:5.0f} ms  grads "
              f"{row['grad_bridge_bytes'] / 1e6:6.2f} MB  bubble {row['bubble_measured']:.2f} "
              f"(pred {row['bubble_predicted']:.2f})",
              flush=True)
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Heterogeneous training: {meta['date']}", "",
             f"Host: {meta['host']} ({meta['cores']} cores), torch {meta['torch']}. Model: tiny preset, seq_len "
             f"{meta['seq_len']}, global batch {meta['global_batch']}, micro-batch {meta['micro_batch']}, fp32. "
             f"Groups: A = 2 x `cpu`, B = 2 x `cpu-emulated` slowed {meta['slowdown']}x (sleep of "
             f"{meta['slowdown'] - 1:g}x each compute span). {meta['steps']} timed steps after {meta['warmup']} "
             f"warm-up; medians. Bytes and seconds are per step, summed over ranks.", "",
             f"Reproduce: `{meta['command']}`", "",
             "| scenario | ranks | layers | replica speeds | step (ms) | tokens/s | bubble meas. | bubble pred. | "
             "bridge MB (msgs) | "
             "bridge staging ms | bridge wait ms | bridge wire est. ms | grad bridge MB | grad bridge ms "
             "(wire est.) | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(x):
        return "" if x is None else f"{x * 1e3:.0f}"

    for r in rows:
        pred = "" if r["bubble_predicted"] is None else f"{r['bubble_predicted']:.2f}"
        pred += " (eq.)" if r["predicted_from"] == "relative" else ""
        speeds = " / ".join(f"{v:.3g}" for v in r["speeds"].values()) if r.get("predicted_from") == "s" else "–"
        lines.append(f"| {r['scenario']} | {r['ranks']} | {r['layers']} | {speeds} | {r['step_s'] * 1e3:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['bubble_measured']:.2f} | {pred} | "
                     f"{r['bridge_bytes'] / 1e6:.2f} ({r['bridge_messages']:.0f}) | {ms(r['bridge_stage_s'])} | "
                     f"{ms(r['bridge_wait_s'])} | {ms(r['bridge_wire_est_s'])} | {r['grad_bridge_bytes'] / 1e6:.2f} | "
                     f"{ms(r['grad_bridge_s'])} ({ms(r['grad_bridge_wire_est_s'])}) | "
                     f"{r['load_avg'][0]}–{r['load_avg'][1]} |")
    wire = next((r["wire"] for r in rows if r.get("wire")), None)
    lines += ["", "Notes:", "",
              "- Every rank of every group shares this host's cores, so heterogeneous rows (4 ranks) are CPU-bound "
              "against the 2-rank group-alone rows; on real accelerators the devices do not compete.",
              "- bubble meas. = 1 - (time inside stage compute) / (forward+backward time), mean over ranks; bubble "
              "pred. = the planner's GPipe simulation from measured per-device speeds, or assuming equal speeds "
              "where marked (eq.) (layouts without hetero.balance); transfers are not modelled.",
              "- bridge staging = encoding, device<->host copies and decoding; bridge wait = blocked on a transfer, "
              "which includes waiting for the peer stage to produce it (an upper bound on wire time); wire est. = "
              "bytes / bandwidth + messages x latency from a gloo ping-pong between rank 0 and the last rank"
              + (f" ({wire['bandwidth_Bps'] / 1e9:.2f} GB/s, {wire['latency_s'] * 1e6:.0f} us one way)" if wire else "")
              + ".",
              "- replica speeds: rows per second of one replica of each group (A / B), measured at start-up "
              "(one block, forward + backward, with the group's tp; CPU time on this host) and used to split "
              "layers and rows. On a loaded 2-core host they are noisy: a wrong estimate shows up as a slower "
              "balanced row (see the load average).",
              "- grad bridge: the cross-vendor gradient sum (leaders only); bytes use the ring all-reduce accounting "
              "(2(n-1)/n of the buffer per leader); its time includes waiting for the slower group.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suanli.bench.hetero", description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--slowdown", type=float, default=2.0)
    p.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="run only these scenarios")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--render", metavar="JSON", help="only rewrite the Markdown report of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(saved["rows"], saved["meta"]))
        return 0
    import torch

    from suanli.infra.config import load_config

    names = args.only or list(SCENARIOS)
    rows = run(names, args.steps, args.warmup, args.slowdown)
    t = load_config(None, BASE).train
    meta = {"date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "seq_len": t.seq_len,
            "global_batch": t.global_batch, "micro_batch": t.micro_batch, "slowdown": args.slowdown,
            "steps": args.steps, "warmup": args.warmup,
            "command": "python -m suanli.bench.hetero " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        from suanli.backends import get_accelerator

        meta["host"] = get_accelerator("cpu").device_name()
    except Exception:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"hetero-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
