"""Shared test fixtures: run a worker script as N real processes on gloo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from suanli.infra.launch import launch_local

WORKERS = Path(__file__).parent / "workers"

os.environ.setdefault("SUANLI_ACCELERATOR", "cpu")


def run_workers(script: str, nproc: int, *args: str, timeout_s: float = 240, env: dict | None = None) -> list[str]:
    """Run tests/workers/<script> as `nproc` ranks; fail the test with every rank's output
    if any rank fails. Returns each rank's output."""
    extra = {"SUANLI_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    res = launch_local([sys.executable, str(WORKERS / script), *map(str, args)], nproc, capture=True,
                       timeout_s=timeout_s, extra_env=extra)
    if res.returncode != 0:
        logs = "\n".join(f"----- rank {r} -----\n{o[-4000:]}" for r, o in enumerate(res.outputs))
        pytest.fail(f"{script} failed (rank {res.failed_rank}, code {res.returncode}):\n{logs}")
    return res.outputs


def json_lines(output: str, tag: str) -> list[dict]:
    """Worker results are printed as `<tag> {json}` lines."""
    return [json.loads(line[len(tag) + 1:]) for line in output.splitlines() if line.startswith(tag + " ")]


@pytest.fixture
def workers():
    return run_workers
