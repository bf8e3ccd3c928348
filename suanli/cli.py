"""The `suanli` command. Each command group lives beside the code it drives and adds its own
argparse sub-parser; this file only lists them (a table, so a new group is one row)."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> "module:function(subparsers)" that registers it
COMMANDS: dict[str, str] = {
    "doctor": "suanli.doctor:add_parser",
    "train": "suanli.infra.train_cli:add_train_parser",
    "data": "suanli.infra.train_cli:add_data_parser",
    "bench": "suanli.bench.cli:add_parser",
    "plan": "suanli.infra.plan_cli:add_parser",
    "health": "suanli.fault.cli:add_health_parser",
    "ckpt": "suanli.fault.cli:add_ckpt_parser",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="suanli", description="Train LLMs on mixed accelerator fleets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, target in COMMANDS.items():
        mod, fn = target.split(":")
        getattr(importlib.import_module(mod), fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Configuration and environment errors (ConfigError, AcceleratorUnavailable, a
        # missing file) are for people: one line naming the field, no traceback.
        if getattr(args, "debug", False):
            raise
        print(f"suanli {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
