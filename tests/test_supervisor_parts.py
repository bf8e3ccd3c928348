"""The supervisor's pieces without Ray: the zygote that forks ranks (a real fork, a real
tiny training run, a real SIGKILL), the cause-vs-consequence test on errors, and the live
view's incremental reading of metrics.jsonl."""

import json
import signal
from pathlib import Path

import pytest

from suanli.infra.cluster.progress import JobProgress
from suanli.infra.cluster.zygote import Zygote
from suanli.infra.config import load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def zygote():
    z = Zygote()
    yield z
    z.close()


def tiny_cfg(run_dir, steps=3) -> str:
    cfg = load_config(ROOT / "examples/tiny.toml", [f"train.steps={steps}", "train.seq_len=32",
                                                     "data.synthetic_tokens=20000", "checkpoint.every_steps=0"])
    cfg.train.run_dir = str(run_dir)
    return to_toml(cfg)


def rank_env(**extra) -> dict:
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0",
            "SUANLI_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def test_zygote_runs_a_rank_again_and_again(zygote, tmp_path):
    for attempt in range(2):
        result = tmp_path / f"result{attempt}.json"
        code = zygote.run(tiny_cfg(tmp_path / f"run{attempt}"), rank_env(), str(result))
        outcome = json.loads(result.read_text())
        assert code == 0 and outcome["steps"] == 3, outcome
        assert len((tmp_path / f"run{attempt}" / "metrics.jsonl").read_text().splitlines()) == 3
    assert zygote.pid is None


def test_a_killed_rank_is_reported_by_its_signal(zygote, tmp_path):
    result = tmp_path / "result.json"
    env = rank_env(SUANLI_INJECT_FAULTS="kill:rank=0:step=1",
                   SUANLI_RANK_LOG=str(tmp_path / "logs" / "rank0.log"))
    code = zygote.run(tiny_cfg(tmp_path / "run"), env, str(result))
    assert code == -signal.SIGKILL and not result.exists()
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "== rank 0 of 1" in log and "step 1/3" in log


def test_training_errors_say_whether_a_collective_broke(zygote, tmp_path):
    result = tmp_path / "result.json"
    code = zygote.run(tiny_cfg(tmp_path / "run"), rank_env(SUANLI_INJECT_FAULTS="raise:rank=0:step=1"), str(result))
    outcome = json.loads(result.read_text())
    assert code == 1 and "injected fault: raise" in outcome["error"] and outcome["comm_failure"] is False

    from suanli.infra.cluster.rank_process import is_comm_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6057: "
                        "Connection reset by peer")
    assert is_comm_failure(gloo) and not is_comm_failure(ValueError("Connection reset by peer"))


def test_live_view_reads_only_new_complete_lines(tmp_path, capsys):
    view = JobProgress(tmp_path, total_steps=4)
    path = tmp_path / "metrics.jsonl"
    row = {"step": 1, "loss": 2.5, "tokens_per_s": 1000.0, "mfu": None}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "step": 2})[:10])  # second line half written
    view.poll(world=2, restarts=0, health=None)
    with open(path, "a") as f:
        f.write(json.dumps({**row, "step": 2})[10:] + "\n")
    view.poll(world=2, restarts=1, health={"ok": 2})
    view.poll(world=2, restarts=1, health={"ok": 2})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 1/4 | loss 2.5000 | 1,000 tok/s | MFU unknown | world 2 | restarts 0",
                     "step 2/4 | loss 2.5000 | 1,000 tok/s | MFU unknown | world 2 | restarts 1 | health ok 2"]


def test_a_guard_out_of_rollbacks_is_reported_as_diverging(zygote, tmp_path):
    result = tmp_path / "result.json"
    cfg = load_config(ROOT / "examples/tiny.toml", ["train.steps=8", "train.seq_len=32", "data.synthetic_tokens=20000",
                                                     "checkpoint.every_steps=2", "fault.max_rollbacks=1"])
    cfg.train.run_dir = str(tmp_path / "run")
    env = rank_env(SUANLI_INJECT_FAULTS="nan:step=3,nan:step=5")
    code = zygote.run(to_toml(cfg), env, str(result))
    outcome = json.loads(result.read_text())
    assert code == 1 and outcome["diverging"] is True and "loss guard" in outcome["error"], outcome
