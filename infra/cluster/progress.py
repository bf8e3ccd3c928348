"""The supervisor's live view of a job: step, loss, tokens/s, MFU, world size, restarts and
the health daemon's verdict on the ranks, one line per step.

Ranks write their own logs to <run_dir>/logs/rank<R>.log; this view is what a person
watching the job reads. On a terminal it is a rich status line that updates in place;
in a pipe or CI log, a plain line per step.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


class JobProgress:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool = True) -> None:
        self.metrics = Path(run_dir) / "metrics.jsonl"
        self.total, self.enabled = total_steps, enabled
        self._offset, self._partial = 0, ""
        self._live = None
        if enabled and sys.stdout.isatty():
            from rich.live import Live

            self._live = Live("", refresh_per_second=4, transient=False)
            self._live.start()

    def new_rows(self) -> list[dict]:
        """metrics.jsonl lines written since the last call (read from where it left off)."""
        if not self.metrics.exists():
            return []
        with open(self.metrics) as f:
            f.seek(self._offset)
            text = self._partial + f.read()
            self._offset = f.tell()
        *lines, self._partial = text.split("\n")
        return [json.loads(x) for x in lines if x.strip()]

    def poll(self, world: int, restarts: int, health: Counter | None) -> None:
        rows = self.new_rows()
        if not self.enabled or not rows:
            return
        for r in rows if self._live is None else rows[-1:]:
            line = self.describe(r, world, restarts, health)
            if self._live is not None:
                self._live.update(line)
            else:
                print(line, flush=True)

    def describe(self, r: dict, world: int, restarts: int, health: Counter | None) -> str:
        mfu = f"{100 * r['mfu']:.2f}%" if r.get("mfu") is not None else "unknown"
        text = (f"step {r['step']}/{self.total} | loss {r['loss']:.4f} | {r.get('tokens_per_s', 0):,.0f} tok/s | "
                f"MFU {mfu} | world {world} | restarts {restarts}")
        if health:
            text += " | health " + " ".join(f"{state} {n}" for state, n in sorted(health.items()))
        return text

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
