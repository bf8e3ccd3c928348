"""Run a benchmark's rank body as N local processes and get rank 0's result back.

Benchmarks that train or communicate need a process group, and one process per device.
The command-line process never joins a group itself: it writes the spec to a JSON file,
starts `python -m suanli.bench.ranks KIND SPEC OUT` through suanli's fail-fast launcher
(torchrun's environment), and reads what rank 0 wrote to OUT. Rank output is captured so
`--json` prints nothing but JSON; on failure the failing rank's tail is in the error.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

# kind -> "module:function(spec: dict) -> dict | None" run on every rank; rank 0 returns the result.
RANK_BODIES: dict[str, str] = {
    "mfu": "suanli.bench.mfu_run:rank_main",
    "comm": "suanli.bench.comm:rank_main",
    "overhead": "suanli.bench.overhead:rank_main",
}


class BenchRunError(RuntimeError):
    """A rank failed; the message carries the failing rank's last output lines."""


def run_ranks(kind: str, spec: dict, nproc: int, timeout_s: float = 1800, threads_per_rank: int | None = None) -> dict:
    from suanli.infra.launch import launch_local

    if kind not in RANK_BODIES:
        raise ValueError(f"unknown benchmark kind {kind!r}; known: {sorted(RANK_BODIES)}")
    with tempfile.TemporaryDirectory(prefix=f"suanli-bench-{kind}-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        extra = {"OMP_NUM_THREADS": str(threads_per_rank)} if threads_per_rank else None
        res = launch_local([sys.executable, "-m", "suanli.bench.ranks", kind, str(spec_path), str(out_path)],
                           nproc, capture=True, timeout_s=timeout_s, extra_env=extra)
        if res.returncode != 0 or not out_path.is_file():
            rank = res.failed_rank if res.failed_rank is not None else 0
            tail = "".join(res.outputs[rank].splitlines(keepends=True)[-25:]) if res.outputs else ""
            why = "timed out" if res.returncode == 124 else f"rank {rank} exited with code {res.returncode}"
            raise BenchRunError(f"bench {kind} with {nproc} process(es): {why}\n{tail}")
        return json.loads(out_path.read_text())


def main(argv: list[str]) -> int:
    kind, spec_path, out_path = argv
    mod, fn = RANK_BODIES[kind].split(":")
    body = getattr(importlib.import_module(mod), fn)
    result = body(json.loads(Path(spec_path).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        # Write then rename: the parent never reads half a file.
        tmp = Path(out_path).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
