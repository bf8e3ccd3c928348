"""`suanli bench lowbw`: the low-bandwidth options over a real weak link.

The same 2-process data-parallel training (tiny model, same seed, same data, same number
of tokens) runs once per option inside a network namespace whose loopback is shaped with
`tc` (token bucket filter at --rate). Both ranks talk over that loopback only, so every
byte of gradient sync crosses the shaped link. Reported per option: wall time of the
training loop, bytes on the wire (the namespace's loopback counter, headers included) and
the payload the options report (comm_bytes), final loss (mean of the last 10% of steps),
and
the speedup over the fp32 all-reduce. Loss-versus-wall-time curves go to a PNG.

Method notes:
- One qdisc shapes the loopback, so both ranks' traffic (both directions) shares --rate:
  each rank effectively gets half of it, as on a half-duplex or shared uplink.
- The loopback MTU is set to 1500 (Ethernet) so the token bucket sees real packet sizes.
- Creating a namespace and a qdisc needs root (CAP_NET_ADMIN); the namespace is removed in
  a finally block whatever happens. Nothing outside the namespace is touched.
- DiLoCo uses H = 10 with outer momentum 0.5 after 20 data-parallel warm-up steps: the
  paper's momentum 0.9 is tuned for H = 500 from a pretrained start, where it averages over
  ~10 outer steps; at H = 10 in a 300-step run that is a third of the run.
- The overlapped options (Streaming DiLoCo, DILOCO_OVERLAP below) run each fragment's sync
  in the background and apply it one inner step later; warm-up steps use the same codec
  (int8 or int4, with error feedback). Per option, `phases_s` says where rank 0's time went:
  forward/backward, warm-up gradient sync, optimizer, outer step (including any wait for an
  overlapped sync) and the per-step loss all-reduce (which also absorbs the ranks' skew).
- `compute-floor` is not an option: DiLoCo that never syncs, i.e. each rank's compute,
  data and optimizer alone. Its wall time bounds what any option can reach here, so the
  speedups read against it (on a shared machine compute is the part that load inflates).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# 4 sequences x 32 tokens per step (2 per rank): little compute per byte of gradient, as when
# GPUs that finish a step in milliseconds sit behind a slow link.
SEQ_LEN, GLOBAL_BATCH = 32, 4
BASE = ['model.preset="tiny"', f"train.seq_len={SEQ_LEN}", f"train.global_batch={GLOBAL_BATCH}", "train.micro_batch=2",
        "train.warmup_steps=10", "train.lr=1e-3", "data.synthetic_tokens=200000", "parallel.dp_replicate=2"]

DILOCO = ["comm.diloco_inner_steps=10", "comm.diloco_warmup_steps=20", "comm.diloco_outer_momentum=0.5"]
# Streaming DiLoCo with overlap (arXiv:2501.18512): 2 fragments, each sync applied 1 inner
# step after launch and merged with alpha = 0.5 (the paper's value). The merge halves what
# an outer step moves the local weights, so the paper's outer momentum 0.9 fits here again
# (with blocking syncs it overshoots at H = 10); outer lr 1.0 measured best of 0.7 / 1.0.
DILOCO_OVERLAP = ["comm.diloco_inner_steps=10", "comm.diloco_warmup_steps=20", "comm.diloco_streaming_fragments=2",
                  "comm.diloco_overlap_steps=1", "comm.diloco_overlap_mix=0.5", "comm.diloco_outer_momentum=0.9",
                  "comm.diloco_outer_lr=1.0"]
# Not an option: DiLoCo that never syncs, i.e. each rank's compute alone. The wall time no
# communication option can beat on this machine.
FLOOR = "compute-floor"

# name -> [section.key=value] overrides on top of BASE
OPTIONS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ['comm.grad="bf16"'],
    "int8": ['comm.grad="int8"'],
    "powersgd": ['comm.grad="powersgd"', "comm.powersgd_rank=4", "comm.powersgd_warmup_steps=10"],
    "diloco": DILOCO,
    "diloco-int8": DILOCO + ['comm.diloco_compress="int8"'],
    "diloco-int8-stream4": DILOCO + ['comm.diloco_compress="int8"', "comm.diloco_streaming_fragments=4"],
    "diloco-int8-overlap": DILOCO_OVERLAP + ['comm.diloco_compress="int8"'],
    "diloco-int4-overlap": DILOCO_OVERLAP + ['comm.diloco_compress="int4"'],
    FLOOR: ["comm.diloco_inner_steps=1000000"],
}
DEFAULT_OPTIONS = ["fp32", "bf16", "int8", "powersgd", "diloco", "diloco-int8", "diloco-int8-overlap",
                   "diloco-int4-overlap", FLOOR]
# Where rank 0's wall time goes (harness.train_step), summed over the steps.
PHASES = ["fwd_bwd_s", "sync_s", "optimizer_s", "outer_s", "loss_sync_s"]
RATE_RE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$", re.IGNORECASE)


@dataclass
class Spec:
    rate: str = "100mbit"
    steps: int = 300
    options: list[str] = field(default_factory=lambda: list(DEFAULT_OPTIONS))


def check_environment(spec: Spec) -> None:
    if not RATE_RE.match(spec.rate):
        raise ValueError(f"--rate: '{spec.rate}' is not a tc rate; write e.g. 100mbit, 25mbit, 1gbit")
    bad = [o for o in spec.options if o not in OPTIONS]
    if bad:
        raise ValueError(f"--options: unknown {bad}; choose from {', '.join(OPTIONS)}")
    if spec.steps < 20:
        raise ValueError(f"--steps: at least 20 (the final loss averages the last 10% of steps), got {spec.steps}")
    if os.geteuid() != 0:
        raise RuntimeError("bench lowbw: needs root (CAP_NET_ADMIN) to create a network namespace and shape its "
                           "loopback with tc; run it as root, e.g. `sudo suanli bench lowbw`, or in a container "
                           "started with --cap-add NET_ADMIN")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"bench lowbw: `{tool}` not found; install iproute2")


def _sh(*cmd: str) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench lowbw: `{' '.join(cmd)}` failed: {res.stderr.strip()}")
    return res.stdout


class ShapedNamespace:
    """A network namespace with only a loopback, rate-limited; removed on exit."""

    def __init__(self, rate: str) -> None:
        self.name = f"suanli-lowbw-{os.getpid()}"
        self.rate = rate

    def __enter__(self) -> "ShapedNamespace":
        _sh("ip", "netns", "add", self.name)
        try:
            self.exec("ip", "link", "set", "dev", "lo", "mtu", "1500")
            self.exec("ip", "link", "set", "dev", "lo", "up")
            self.exec("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", self.rate, "burst", "32kbit",
                      "latency", "50ms")
        except Exception:
            self.__exit__()
            raise
        return self

    def exec(self, *cmd: str) -> str:
        return _sh("ip", "netns", "exec", self.name, *cmd)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def tx_bytes(self) -> int:
        for line in self.exec("cat", "/proc/net/dev").splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
        raise RuntimeError("bench lowbw: no lo line in the namespace's /proc/net/dev")

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def rank_worker(spec: dict) -> None:
    """One training rank (runs inside the namespace)."""
    import torch.distributed as dist

    import suanli
    from suanli.infra.config import load_config
    from suanli.infra.lowbw.harness import build, train

    cfg = load_config(None, BASE + [f"train.steps={spec['steps']}"] + OPTIONS[spec["option"]])
    run = build(cfg)
    records = train(run)
    run.comm.close()   # DiLoCo's background syncs finish before the group goes
    if run.ctx.rank == 0:
        print("RESULT " + json.dumps({"records": records, "path": run.comm.describe()["path"]}), flush=True)
    dist.barrier()
    suanli.shutdown()


def run_option(ns: ShapedNamespace, option: str, steps: int) -> dict:
    from suanli.infra.launch import launch_local

    env = {"SUANLI_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = ns.prefix() + [sys.executable, "-m", "suanli.bench.lowbw", "--rank-worker",
                         json.dumps({"option": option, "steps": steps})]
    before = ns.tx_bytes()
    res = launch_local(cmd, 2, capture=True, timeout_s=3600, extra_env=env)
    wire = ns.tx_bytes() - before
    if res.returncode != 0:
        raise RuntimeError(f"bench lowbw: option {option}: rank {res.failed_rank} failed:\n"
                           f"{res.outputs[res.failed_rank or 0][-3000:]}")
    out = next(json.loads(l[7:]) for l in res.outputs[0].splitlines() if l.startswith("RESULT "))
    rec = out["records"]
    path = "no gradient sync (reference, not an option)" if option == FLOOR else out["path"]
    phases = {k: round(sum(r[k] for r in rec), 2) for k in PHASES}
    return {"option": option, "path": path, "wall_s": rec[-1]["wall_s"], "wire_bytes": wire, "phases_s": phases,
            "payload_bytes_rank0": sum(r["comm_bytes"] for r in rec),
            "final_loss": _final_loss(rec),
            "curve": [[r["wall_s"], r["loss"]] for r in rec]}


def _final_loss(records: list[dict]) -> float:
    """Mean training loss over the last 10% of steps: one step's batch is too noisy."""
    tail = records[-max(10, len(records) // 10):]
    return sum(r["loss"] for r in tail) / len(tail)


def run_lowbw(spec: Spec) -> dict:
    check_environment(spec)
    results = []
    with ShapedNamespace(spec.rate) as ns:
        for option in spec.options:
            print(f"bench lowbw: {option} ...", file=sys.stderr, flush=True)
            results.append(run_option(ns, option, spec.steps))
    base = next((r for r in results if r["option"] == "fp32"), results[0])
    for r in results:
        r["speedup_vs_fp32"] = base["wall_s"] / r["wall_s"]
        r["loss_vs_fp32"] = (r["final_loss"] - base["final_loss"]) / base["final_loss"]
    return {"rate": spec.rate, "steps": spec.steps, "tokens": spec.steps * GLOBAL_BATCH * SEQ_LEN, "config": BASE,
            "options": {o: OPTIONS[o] for o in spec.options}, "load_avg": os.getloadavg(),
            "cpu_count": os.cpu_count(), "results": results}


def best_option(report: dict, loss_tol: float = 0.03) -> dict | None:
    ok = [r for r in report["results"] if r["option"] not in ("fp32", FLOOR) and r["loss_vs_fp32"] <= loss_tol]
    return max(ok, key=lambda r: r["speedup_vs_fp32"]) if ok else None


def format_report(report: dict) -> str:
    lines = [f"# Low-bandwidth options at {report['rate']} (2 ranks, shaped loopback)", "",
             f"tiny model, {report['steps']} steps x {GLOBAL_BATCH} sequences x {SEQ_LEN} tokens = "
             f"{report['tokens']:,} tokens, same seed and data for every option; final loss = mean of the last 10% of steps; "
             f"{report['cpu_count']} CPU cores, load average "
             f"{' '.join(f'{x:.1f}' for x in report['load_avg'])} at the end.", "",
             "| option | path | wall s | speedup vs fp32 | wire MB | payload MB (rank 0) | final loss | vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['option']} | {r['path']} | {r['wall_s']:.1f} | {r['speedup_vs_fp32']:.1f}x | "
                     f"{r['wire_bytes'] / 1e6:.1f} | {r['payload_bytes_rank0'] / 1e6:.1f} | {r['final_loss']:.4f} | "
                     f"{100 * r['loss_vs_fp32']:+.1f}% |")
    if all("phases_s" in r for r in report["results"]):
        lines += ["", "Where rank 0's wall time went (s, summed over steps):", "",
                  "| option | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
        lines += [f"| {r['option']} | " + " | ".join(f"{r['phases_s'][k]:.1f}" for k in PHASES) + " |"
                  for r in report["results"]]
    best = best_option(report)
    floor = next((r for r in report["results"] if r["option"] == FLOOR), None)
    lines += ["", "Best option with final loss within 3% of fp32: "
              + (f"**{best['option']}**, {best['speedup_vs_fp32']:.1f}x faster" if best else "none")]
    if floor is not None:
        lines.append(f"Compute floor (no sync at all): {floor['wall_s']:.1f} s, i.e. at most "
                     f"{floor['speedup_vs_fp32']:.1f}x over fp32 on this machine at this load.")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    k = 10  # one step's batch is noisy: plot the mean of the last k steps
    for r in report["results"]:
        xs, ys = zip(*r["curve"])
        smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        style = {"linestyle": ":"} if r["option"] == FLOOR else {}
        ax.plot(xs, smooth, label=f"{r['option']} ({r['wall_s']:.0f} s)", linewidth=1.4, **style)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(f"training loss (mean of last {k} steps)")
    ax.set_title(f"Loss vs wall time, 2 ranks over a {report['rate']} link")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lowbw-{time.strftime('%Y%m%d')}-{report['rate']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(format_report(report) + f"\n\n![loss vs wall time]({stem.name}.png)\n")
    return stem


def add_arguments(p) -> None:
    """For `suanli bench lowbw` (bench/cli.py registers it with these arguments)."""
    p.add_argument("--rate", default="100mbit", help="link rate, tc syntax (100mbit, 25mbit, 1gbit)")
    p.add_argument("--steps", type=int, default=300,
                   help=f"training steps per option ({GLOBAL_BATCH} x {SEQ_LEN} tokens each)")
    p.add_argument("--options", default=",".join(DEFAULT_OPTIONS),
                   help=f"comma-separated, from: {', '.join(OPTIONS)}")
    p.add_argument("--out", default="bench/results", help="directory for lowbw-<date>-<rate>.md/.json/.png")
    p.add_argument("--json", action="store_true")


def run_cli(args) -> int:
    """The action for `suanli bench lowbw`."""
    spec = Spec(args.rate, args.steps, [o.strip() for o in args.options.split(",") if o.strip()])
    report = run_lowbw(spec)
    stem = write_results(report, args.out)
    print(json.dumps(report, indent=2) if args.json else format_report(report) + f"\n\nwritten: {stem}.md/.json/.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m suanli.bench.lowbw", description=__doc__.splitlines()[0])
    ap.add_argument("--rank-worker", default=None, help=argparse.SUPPRESS)
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.rank_worker:
        rank_worker(json.loads(args.rank_worker))
        return 0
    try:
        return run_cli(args)
    except (ValueError, RuntimeError) as e:
        print(f"suanli bench lowbw: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
