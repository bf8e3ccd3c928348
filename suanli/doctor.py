"""`suanli doctor`: what hardware and software is here, and is it healthy.

Every known backend is listed with whether it is usable and why not, so a user on a mixed
fleet can see at a glance which vendor stack is missing on a node.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# distribution names whose versions matter to a training job
PACKAGES = ("torch", "torch-npu", "torch-mlu", "torch-musa", "intel-extension-for-pytorch", "nvidia-ml-py",
            "ray", "grpcio", "protobuf", "numpy")


def collect() -> dict:
    import torch

    from suanli.backends import AcceleratorUnavailable, get_accelerator, probe_all

    report: dict = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        acc = get_accelerator()
        report["accelerator"] = acc.name
    except AcceleratorUnavailable as e:
        report.update(accelerator=None, error=str(e), backends=probe_all())
        return report
    report["comm_backend"] = acc.comm_backend
    report["device_type"] = acc.device_type
    count = acc.device_count()
    report["device_count"] = count
    report["devices"] = [acc.device_name(i) for i in range(count)]
    report["backends"] = probe_all()
    peaks = {d: acc.peak_flops(d) for d in ("bf16", "fp16", "fp32", "fp8")}
    report["peak_tflops"] = {d: (None if v is None else round(v / 1e12, 1)) for d, v in peaks.items()}
    report["supported_dtypes"] = acc.supported_dtypes()
    report["fused_adamw"] = acc.fused_adamw_kind()
    report["visible_devices_env"] = {acc.visible_devices_env: os.environ.get(acc.visible_devices_env)} \
        if acc.visible_devices_env else {}
    report["ray_resource"] = acc.ray_resource
    report["watchdog_env"] = acc.watchdog_env()
    report["health"] = [h.as_dict() for h in acc.health()]
    report["torch_cuda_build"] = torch.version.cuda
    report["torch_hip_build"] = getattr(torch.version, "hip", None)
    report["packages"] = {p: _version(p) for p in PACKAGES}
    return report


def render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if report.get("accelerator") is None:
        con.print(f"[red]no accelerator:[/red] {report.get('error')}")
    else:
        con.print(f"[bold]accelerator[/bold] {report['accelerator']}  comm {report['comm_backend']}  "
                  f"devices {report['device_count']}: {', '.join(sorted(set(report['devices'])))}")
    t = Table(title="backends")
    for col in ("backend", "available", "why"):
        t.add_column(col)
    for b in report["backends"]:
        t.add_row(b["name"], "[green]yes[/green]" if b["available"] else "no", b["reason"])
    con.print(t)
    if report.get("accelerator") is None:
        return
    peaks = ", ".join(f"{d} {'unknown' if v is None else f'{v} TFLOP/s'}" for d, v in report["peak_tflops"].items())
    con.print(f"[bold]peak per device[/bold] {peaks}"
              + ("  (not in the table: measure with `suanli bench peak`)" if report["peak_tflops"]["bf16"] is None else ""))
    con.print(f"[bold]fused AdamW[/bold] {report['fused_adamw']}   [bold]dtypes[/bold] {', '.join(report['supported_dtypes'])}")
    h = Table(title="health")
    for col in ("dev", "temp °C", "power W", "util %", "mem used / total GiB", "ECC corr/uncorr", "source"):
        h.add_column(col)
    fmt = lambda v: "-" if v is None else (f"{v:.0f}" if isinstance(v, float) else str(v))  # noqa: E731
    gib = lambda v: "-" if v is None else f"{v / 2**30:.1f}"  # noqa: E731
    for r in report["health"]:
        h.add_row(str(r["index"]), fmt(r["temperature_c"]), fmt(r["power_w"]), fmt(r["utilization_pct"]),
                  f"{gib(r['memory_used_bytes'])} / {gib(r['memory_total_bytes'])}",
                  f"{fmt(r['ecc_errors_corrected'])}/{fmt(r['ecc_errors_uncorrected'])}", r["source"])
    con.print(h)
    con.print("[bold]packages[/bold] " + ", ".join(f"{k} {v}" for k, v in report["packages"].items() if v))


def run(args) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render(report)
    return 0 if report.get("accelerator") else 1


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="what hardware/software is here, and is it healthy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
