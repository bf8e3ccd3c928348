"""Benchmark results as files: dated result directories, Markdown tables, PNG charts, and
the machine description every result file starts with (what ran, where, when)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path


def _pct(x) -> str:
    return "unknown" if x is None else f"{100 * x:.2f}%"


def _num(x, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def results_dir(root: Path, device: str, date: datetime.date | None = None) -> Path:
    """root/<YYYY-MM-DD>-<device>/, created."""
    d = Path(root) / f"{(date or datetime.date.today()).isoformat()}-{slug(device)}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def lscpu() -> dict:
    """Model name, CPU count and cores per socket from `lscpu` (or what Python knows)."""
    info = {"cpu_model": platform.processor() or None, "cpus": os.cpu_count()}
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update(cpu_model=fields.get("Model name", info["cpu_model"]),
                    cpus=int(fields.get("CPU(s)", info["cpus"] or 0)) or info["cpus"],
                    cores_per_socket=fields.get("Core(s) per socket"), sockets=fields.get("Socket(s)"),
                    threads_per_core=fields.get("Thread(s) per core"))
    return info


def machine_info() -> dict:
    import torch

    from suanli.backends import get_accelerator

    acc = get_accelerator()
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "accelerator": acc.name,
            "device": acc.device_name(), "device_count": acc.device_count(), "torch": torch.__version__,
            "python": platform.python_version(), "os": platform.platform(), **lscpu()}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_markdown(m: dict) -> str:
    rows = [("date", m["date"]), ("accelerator", f"{m['accelerator']} ({m['device_count']} x {m['device']})"),
            ("CPU (lscpu)", f"{m.get('cpu_model')}, {m.get('cpus')} CPUs"
                            + (f", {m['cores_per_socket']} cores/socket x {m['sockets']} socket(s)"
                               if m.get("cores_per_socket") else "")),
            ("software", f"torch {m['torch']}, Python {m['python']}, {m['os']}")]
    if "load_average" in m:
        rows.append(("load average at start (1, 5, 15 min)", ", ".join(map(str, m["load_average"]))))
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# ---- peak ----
def peak_markdown(rows: list[dict]) -> str:
    out = ["| dtype | measured TFLOP/s | best shape (m,k,n) | HAL table TFLOP/s | measured / table |",
           "|---|---:|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['dtype']} | {r['measured_tflops']:.4f} | {','.join(map(str, r['best_shape']))} | "
                   f"{_num(r['table_tflops'], '.1f') if r['table_tflops'] is not None else 'unknown'} | "
                   f"{_pct(r['measured_over_table']) if r['measured_over_table'] is not None else '-'} |")
    return "\n".join(out)


# ---- comm ----
def comm_markdown(r: dict) -> str:
    out = [f"{r['op']}, {r['world_size']} processes, backend {r['backend']}", "",
           "| size (B) | time (us) | algbw (GB/s) | busbw (GB/s) |", "|---:|---:|---:|---:|"]
    for row in r["rows"]:
        out.append(f"| {row['size_bytes']:,} | {row['time_us']:.1f} | {row['algbw_GBps']:.3f} | "
                   f"{row['busbw_GBps']:.3f} |")
    return "\n".join(out)


# ---- mfu sweep ----
SWEEP_COLUMNS = ("layout", "procs", "tokens/s", "tokens/s/device", "TFLOP/s/device", "MFU", "HFU", "peak (source)",
                 "compute", "exposed comm", "bubble measured / formula", "peak mem (MiB)")


def sweep_row(r: dict) -> list[str]:
    if "error" in r:
        return [r["layout"], str(r.get("world_size", "")), f"failed: {r['error']}"] + [""] * (len(SWEEP_COLUMNS) - 3)
    b = r.get("breakdown") or {}
    bub = r.get("bubble") or {}
    bubble = "-" if r["pp"] == 1 else f"{_pct(bub.get('measured'))} / {_pct(bub.get('formula'))}"
    peak = "unknown" if r["peak_tflops"] is None else f"{r['peak_tflops']:.4f} ({r['peak_source']})"
    return [r["layout"], str(r["world_size"]), _num(r["tokens_per_s"]), _num(r["tokens_per_s_per_device"]),
            f"{r['tflops_per_device']:.4f}", _pct(r["mfu"]), _pct(r["hfu"]), peak,
            _pct(b.get("compute")) if b else "-", _pct(b.get("exposed_comm")) if b else "-", bubble,
            f"{r['peak_memory_bytes'] / 2 ** 20:,.0f}"]


def sweep_markdown(results: list[dict]) -> str:
    lines = ["| " + " | ".join(SWEEP_COLUMNS) + " |", "|" + "---|" * len(SWEEP_COLUMNS)]
    lines += ["| " + " | ".join(sweep_row(r)) + " |" for r in results]
    return "\n".join(lines)


def plot_mfu_by_layout(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    known = all(r["mfu"] is not None for r in ok)
    values = [100 * r["mfu"] if known else r["tflops_per_device"] for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(ok) + 2), 4))
    ax.bar([r["layout"] for r in ok], values, color="#4C72B0")
    ax.set_ylabel("MFU (%)" if known else "achieved TFLOP/s per device (MFU unknown: no peak)")
    ax.set_title(f"{ok[0]['model'] if ok else ''}: MFU by layout" if known else "achieved TFLOP/s by layout")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    for lbl in ax.get_xticklabels():
        lbl.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(results: list[dict], path: Path) -> Path:
    """Best global tokens/s at each process count, against linear scaling from one process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[int, float] = {}
    for r in results:
        if "error" not in r:
            best[r["world_size"]] = max(best.get(r["world_size"], 0.0), r["tokens_per_s"])
    procs = sorted(best)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(procs, [best[p] for p in procs], "o-", label="measured (best layout)")
    if 1 in best:
        ax.plot(procs, [best[1] * p for p in procs], "--", color="gray", label="linear from 1 process")
    ax.set_xlabel("processes")
    ax.set_ylabel("tokens/s (global)")
    ax.set_xticks(procs)
    ax.legend()
    ax.set_title("scaling of tokens/s with processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep(results: list[dict], out_dir: Path, command: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "mfu_sweep.json", "markdown": out_dir / "mfu_sweep.md",
             "mfu_png": out_dir / "mfu_by_layout.png", "scaling_png": out_dir / "scaling.png"}
    files["json"].write_text(json.dumps({"command": command, "results": results}, indent=2))
    files["markdown"].write_text(f"# MFU sweep\n\n`{command}`\n\n{sweep_markdown(results)}\n\n"
                                 f"![MFU by layout](mfu_by_layout.png)\n![scaling](scaling.png)\n")
    if any("error" not in r for r in results):
        plot_mfu_by_layout(results, files["mfu_png"])
        plot_scaling(results, files["scaling_png"])
    return files


__all__ = ["results_dir", "machine_info", "machine_markdown", "peak_markdown", "comm_markdown", "sweep_markdown",
           "write_sweep", "plot_mfu_by_layout", "plot_scaling", "lscpu"]
