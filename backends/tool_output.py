"""Reading vendor health tools (nvidia-smi's cousins: npu-smi, cnmon, mthreads-gmi, rocm-smi,
hy-smi, xpu-smi). Pure text-to-reading helpers, so tests feed them sample output; a missing,
failing or hanging tool gives None, never a made-up number."""

from __future__ import annotations

import re
from typing import Any, Iterable

from .base import DeviceHealth


def run_tool(cmd: list[str], timeout_s: float = 5.0) -> str | None:
    """Run a vendor health tool; None when it is missing, fails or hangs (a health probe
    must never hang the caller)."""
    import shutil
    import subprocess

    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def first_number(text: str, pattern: str) -> float | None:
    m = re.search(pattern, text, re.IGNORECASE | re.MULTILINE)
    if not m:
        return None
    try:
        return float(m.group(1))
    except (TypeError, ValueError):
        return None


# ---- pure helpers for vendor health tools (tests feed them sample text) ----

def parse_number(value: Any) -> float | None:
    """Leading number of a tool field ("58 C", "220.5 W", "87 %"); None for "N/A" and friends."""
    m = re.search(r"-?\d+(?:\.\d+)?", str(value)) if value is not None else None
    return float(m.group()) if m else None


_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_bytes(value: Any, default_unit: str = "MiB") -> int | None:
    """"49152 MiB" -> bytes. Vendor tools write MB/GB but mean MiB/GiB, so both are binary."""
    if value is None:
        return None
    m = re.search(r"(-?\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\b", str(value), re.IGNORECASE)
    if not m:
        return None
    unit = (m.group(2) or (default_unit[0] if default_unit[0] in "KMGT" else "")).lower()
    return int(float(m.group(1)) * _BYTE_UNITS[unit])


def parse_indented_report(text: str, device_header: str) -> list[tuple[int, dict[str, str]]]:
    """Parse a "Key : value" report nested by indentation (the nvidia-smi -q layout that
    mthreads-gmi -q and cnmon info follow) into one {"Section/Key": value} dict per device.
    A device starts at an unindented line matching `device_header`; its first group, if
    numeric, is the device id, else an "Index" field, else the order of appearance."""
    devices: list[tuple[int | None, dict[str, str]]] = []
    stack: list[tuple[int, str]] = []  # (indent, section name)
    for raw in text.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip()
        m = re.match(device_header, line) if indent == 0 else None
        if m:
            gid = m.group(1) if m.groups() else None
            devices.append((int(gid) if gid and gid.isdigit() else None, {}))
            stack = []
            continue
        if not devices:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, sep, value = line.partition(":")
        if not sep or not value.strip():
            stack.append((indent, key.strip()))
            continue
        path = "/".join([s for _, s in stack] + [key.strip()])
        devices[-1][1][path] = value.strip()
    out = []
    for order, (gid, fields) in enumerate(devices):
        idx = gid if gid is not None else parse_number(fields.get("Index"))
        out.append((int(idx) if idx is not None else order, fields))
    return out


def pick_field(fields: dict[str, str], patterns: Iterable[str]) -> str | None:
    """First field whose "Section/Key" path fully matches one of `patterns`, in pattern order."""
    for pat in patterns:
        for path, value in fields.items():
            if re.fullmatch(pat, path, re.IGNORECASE):
                return value
    return None


def readings_from_report(text: str, device_header: str, table: dict[str, Iterable[str]], source: str) -> list[DeviceHealth]:
    """parse_indented_report + a table {DeviceHealth field: "Section/Key" patterns} -> readings.
    Vendors then differ only in data: the header regex and the table."""
    out = []
    for index, fields in parse_indented_report(text, device_header):
        values: dict[str, Any] = {}
        for attr, patterns in table.items():
            raw = pick_field(fields, patterns)
            if attr == "name":
                values[attr] = raw
            elif attr.endswith("_bytes"):
                values[attr] = parse_bytes(raw)
            elif attr.startswith("ecc_"):
                n = parse_number(raw)
                values[attr] = None if n is None else int(n)
            else:
                values[attr] = parse_number(raw)
        out.append(DeviceHealth(index=index, source=source, **values))
    return out


def remap_to_visible(readings: list[DeviceHealth], visible: str | None) -> list[DeviceHealth]:
    """Vendor tools number devices physically; torch numbers the visible ones from 0. With a
    visible-devices list ("2,3"), keep those in that order; without one, the tool sees what
    the process sees, so renumber in physical order."""
    by_id = {r.index: r for r in readings}
    ids = [int(t) for t in visible.split(",") if t.strip().isdigit()] if visible else sorted(by_id)
    out = []
    for logical, phys in enumerate(i for i in ids if i in by_id):
        by_id[phys].index = logical
        out.append(by_id[phys])
    return out
