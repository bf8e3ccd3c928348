"""`suanli ckpt ls|verify|convert RUN_DIR`: look after a run's checkpoints from the shell.

ls       every entry with its status (committed, torn, uncommitted, abandoned) and size
verify   SHA-256 of every file against its manifest, plus a safe parse of the metadata;
         exits 1 naming each corrupt file
convert  the newest valid (or --step) checkpoint's model as one safetensors file
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .checkpointer import find_latest_valid, verify_checkpoint
from .manifest import CheckpointInfo, read_latest, scan, step_dir_name


def checkpoints_dir(run_dir: str) -> Path:
    """RUN_DIR/checkpoints, or RUN_DIR itself when it is a checkpoints directory."""
    p = Path(run_dir)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.is_dir() and scan(p):
        return p
    raise FileNotFoundError(f"no checkpoints under {p}: expected {p}/checkpoints/step-NNNNNNNN/ (is RUN_DIR right?)")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _entries(d: Path, step: int | None) -> list[CheckpointInfo]:
    entries = scan(d)
    if step is not None:
        entries = [c for c in entries if c.step == step]
        if not entries:
            raise FileNotFoundError(f"no checkpoint for step {step} in {d} (suanli ckpt ls {d.parent} lists them)")
    return entries


def run_ls(args) -> int:
    d = checkpoints_dir(args.run_dir)
    latest = read_latest(d)
    entries = [verify_checkpoint(c, hashes=args.verify) for c in scan(d)]
    if args.json:
        print(json.dumps({"dir": str(d), "latest": latest, "checkpoints": [c.as_dict() for c in entries]}, indent=2))
        return 0
    print(f"checkpoints in {d} (LATEST -> {latest or 'none'})")
    print(f"{'STEP':>10}  {'STATUS':<12} {'SIZE':>10}  {'WRITTEN':<19}  NOTE")
    for c in entries:
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.manifest["created"])) if c.manifest else "-"
        note = "LATEST" if c.name == latest else ("; ".join(c.problems) if c.problems else "")
        print(f"{c.step:>10}  {c.status:<12} {_size(c.size_bytes()):>10}  {written:<19}  {note}")
    return 0


def run_verify(args) -> int:
    d = checkpoints_dir(args.run_dir)
    bad, checked, report = 0, 0, []
    for c in _entries(d, args.step):
        if c.status in ("committed", "torn"):
            verify_checkpoint(c, hashes=True)
            checked += 1
            bad += c.status != "ok"
        report.append(c)
    if args.json:
        print(json.dumps({"dir": str(d), "ok": bad == 0 and checked > 0,
                          "checkpoints": [c.as_dict() for c in report]}, indent=2))
    else:
        for c in report:
            label = {"ok": "ok", "corrupt": "CORRUPT", "torn": "TORN"}.get(c.status, f"{c.status} (not a checkpoint)")
            print(f"{c.name}: {label}")
            if c.status in ("corrupt", "torn"):
                for p in c.problems:
                    print(f"  {p}")
        if checked == 0:
            print(f"no committed checkpoint in {d}", file=sys.stderr)
        elif bad:
            print(f"{bad} of {checked} checkpoints failed verification; resume skips them and uses the newest "
                  f"valid one", file=sys.stderr)
    return 1 if bad or checked == 0 else 0


def run_convert(args) -> int:
    from .convert import export_safetensors

    d = checkpoints_dir(args.run_dir)
    if args.step is None:
        chosen, _ = find_latest_valid(d)
        if chosen is None:
            raise FileNotFoundError(f"no valid checkpoint in {d} to convert (suanli ckpt verify {args.run_dir})")
    else:
        chosen = verify_checkpoint(CheckpointInfo(args.step, d / step_dir_name(args.step), "committed"))
        if chosen.status != "ok":
            raise ValueError(f"checkpoint step {args.step} does not verify: {'; '.join(chosen.problems)}")
    out = Path(args.out) if args.out else d.parent / "export" / f"model-{chosen.name}.safetensors"
    res = export_safetensors(chosen.path, out, args.dtype)
    print(f"wrote {res['path']}: {res['tensors']} tensors, {res['parameters']:,} parameters, {_size(res['bytes'])} "
          f"(from {chosen.name})")
    return 0


def add_ckpt_parser(sub) -> None:
    p = sub.add_parser("ckpt", help="list, verify and convert checkpoints")
    csub = p.add_subparsers(dest="ckpt_command", required=True, metavar="CKPT")
    ls = csub.add_parser("ls", help="list a run's checkpoints with their status")
    ls.add_argument("run_dir", metavar="RUN_DIR")
    ls.add_argument("--verify", action="store_true", help="hash every file (slow on large checkpoints)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_ls)
    v = csub.add_parser("verify", help="check every file's SHA-256 against the manifest; exit 1 if any is corrupt")
    v.add_argument("run_dir", metavar="RUN_DIR")
    v.add_argument("--step", type=int, default=None, help="only this step")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=run_verify)
    c = csub.add_parser("convert", help="export a checkpoint's model as one safetensors file")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--step", type=int, default=None, help="default: the newest valid checkpoint")
    c.add_argument("--out", default=None, help="default: RUN_DIR/export/model-step-NNNNNNNN.safetensors")
    c.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="cast floating tensors")
    c.set_defaults(func=run_convert)


__all__ = ["add_ckpt_parser"]
