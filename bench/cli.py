"""`suanli bench ...`: measurement commands (each adds its own sub-parser here)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure peak FLOPS, MFU, collectives, recovery")
    p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
