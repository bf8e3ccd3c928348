"""Fault-injection specs parse strictly, and the injected faults really happen."""

import os
import subprocess
import sys

import pytest

from suanli.infra.faults import FaultSpec, parse_fault

ENV = {**os.environ, "SUANLI_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def test_parse_specs():
    assert parse_fault("kill:rank=1:step=30") == FaultSpec("kill", 1, 30)
    assert parse_fault("nan:step=40") == FaultSpec("nan", -1, 40)
    assert parse_fault("slow:rank=1:factor=3") == FaultSpec("slow", 1, 0, 3.0)
    for bad, msg in [("explode:rank=1", "unknown kind 'explode'"), ("kill:rank=1", "missing step"),
                     ("kill:rank=1:step=x", "step='x' is not a number"), ("kill:rank=1:when=3", "'when' is not a key"),
                     ("kill:rank1:step=3", "should be key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_fault(bad)


def _train(tmp_path, *extra):
    return subprocess.run([sys.executable, "-m", "suanli.cli", "train", "examples/tiny.toml", "--nproc", "2",
                           "--run-dir", str(tmp_path / "run"), "--set", "train.steps=4", "--set", "train.seq_len=32",
                           "--set", "data.synthetic_tokens=20000", *extra],
                          capture_output=True, text=True, env=ENV, timeout=240)


def test_injected_kill_stops_the_gang_fast(tmp_path):
    r = _train(tmp_path, "--inject-fault", "kill:rank=1:step=2")
    assert r.returncode == 128 + 9                 # the shell's convention for a SIGKILLed child
    assert "rank 1 was killed by SIGKILL" in r.stderr
    assert (tmp_path / "run" / "faults" / "kill-rank1-step2-r1").exists()


def test_injected_exception_names_the_rank(tmp_path):
    r = _train(tmp_path, "--inject-fault", "raise:rank=0:step=1")
    assert r.returncode != 0
    assert "injected fault: raise on rank 0 after step 1" in r.stdout + r.stderr
