"""Write every Python thread's stack to `<run_dir>/stacks/rank<R>-<time>.txt`.

Called from the heartbeat reporter's own thread when the daemon asks: a rank stuck in a C
call (a blocked collective) still runs that thread, so the dump shows where the training
thread is waiting.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path


def format_stacks(reason: str = "") -> str:
    names = {t.ident: t for t in threading.enumerate()}
    me = threading.get_ident()
    lines = [f"# pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}" + (f": {reason}" if reason else "")]
    for ident, frame in sys._current_frames().items():
        t = names.get(ident)
        name = t.name if t is not None else "?"
        tag = " (this dump)" if ident == me else ""
        lines.append(f"\n## thread {name} id={ident}{' daemon' if t is not None and t.daemon else ''}{tag}")
        lines.extend(s.rstrip("\n") for s in traceback.format_stack(frame))
    return "\n".join(lines) + "\n"


def dump_stacks(run_dir: str | Path, rank: int, reason: str = "") -> Path:
    d = Path(run_dir) / "stacks"
    d.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path = d / f"rank{rank}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{int(now * 1000) % 1000:03d}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(format_stacks(reason))
    os.replace(tmp, path)  # readers never see half a file
    return path
