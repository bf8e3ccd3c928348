"""The local launcher names a failure's cause: the rank that died, and how."""

import sys

from suanli.infra.launch import launch_local

SCRIPT = """
import os, signal, time
rank = int(os.environ["RANK"])
if rank == 1:
    os.kill(os.getpid(), signal.SIGSEGV)
time.sleep(60)  # rank 0 would wait for its peer forever; the launcher must stop it
"""


def test_signal_death_is_reported_and_peers_stopped():
    res = launch_local([sys.executable, "-c", SCRIPT], 2, capture=True, timeout_s=30)
    assert (res.failed_rank, res.returncode) == (1, -11)
    assert res.describe() == "rank 1 was killed by SIGSEGV"
    assert "Fatal Python error: Segmentation fault" in res.outputs[1]  # faulthandler left a stack


def test_exit_code_and_success_are_described():
    bad = launch_local([sys.executable, "-c", "import os, sys; sys.exit(3 if os.environ['RANK'] == '0' else 0)"],
                       2, capture=True, timeout_s=30)
    assert bad.describe() == "rank 0 exited with code 3"
    ok = launch_local([sys.executable, "-c", "print('hi')"], 2, capture=True, timeout_s=30)
    assert ok.describe() == "all ranks exited 0" and ok.outputs == ["hi\n", "hi\n"]
