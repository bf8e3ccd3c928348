"""`suanli health ...` and `suanli ckpt ...`: the fault-tolerance commands."""

from __future__ import annotations


def add_health_parser(sub) -> None:
    p = sub.add_parser("health", help="the cluster health daemon and its views")
    p.add_subparsers(dest="health_command", required=True, metavar="HEALTH")


def add_ckpt_parser(sub) -> None:
    p = sub.add_parser("ckpt", help="list, verify and convert checkpoints")
    p.add_subparsers(dest="ckpt_command", required=True, metavar="CKPT")
