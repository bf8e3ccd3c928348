"""Checkpointer in one process: commit layout, verification, fallback from a corrupt shard,
retention, refusal of pickle payloads, and the `suanli ckpt` commands.

Multi-process resume and resharding are in test_checkpoint_resume.py; SIGKILL crash
consistency in test_checkpoint_crash.py.
"""

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from suanli.cli import main as cli
from suanli.fault.checkpoint import Checkpointer, CheckpointError, TrainState
from suanli.fault.checkpoint.manifest import MANIFEST, build_manifest, write_manifest
from suanli.fault.checkpoint.safe_load import RestrictedUnpickler, SafeLoadPlanner, load_metadata

# One process, no process group, on purpose; DCP warns about that on every call.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = s["value"]


def make_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainState([model], opt, {"counter": Counter()}, meta={"layout": {"world_size": 1}})


def train_step(state: TrainState, x: torch.Tensor) -> float:
    loss = state.modules[0](x).pow(2).mean()
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.stateful["counter"].value += 1
    return loss.item()


def save_steps(tmp_path: Path, steps, **kw) -> tuple[Checkpointer, TrainState, torch.Tensor]:
    ck = Checkpointer(tmp_path / "checkpoints", every_steps=1, **kw)
    state, x = make_state(), torch.randn(4, 8)
    for s in steps:
        train_step(state, x)
        ck.save_async(s, state)
    ck.wait()
    return ck, state, x


def test_resume_continues_bitwise(tmp_path):
    ck, state, x = save_steps(tmp_path, [1, 2, 3])
    reference = [train_step(state, x) for _ in range(3)]
    fresh = make_state(seed=1)   # different initial weights: everything must come from the checkpoint
    loaded = Checkpointer(tmp_path / "checkpoints").resume(fresh)
    assert loaded["step"] == 3 and fresh.stateful["counter"].value == 3
    assert [train_step(fresh, x) for _ in range(3)] == reference


def test_commit_layout(tmp_path):
    ck, _, _ = save_steps(tmp_path, [1, 2])
    d = tmp_path / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["LATEST", "step-00000001", "step-00000002"]
    assert (d / "LATEST").read_text().strip() == "step-00000002"
    step_dir = d / "step-00000002"
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["step"] == 2 and manifest["versions"]["torch"] == torch.__version__
    on_disk = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    for rel in ("train_state.json", "rng/rank00000.json"):   # everything but DCP's files is JSON
        json.loads((step_dir / rel).read_text())
    assert ck.last_stall_s is not None and ck.last_stall_s >= 0


def test_corrupt_shard_byte_falls_back_and_is_named(tmp_path, capsys):
    ck, _, _ = save_steps(tmp_path, [1, 2])
    shard = tmp_path / "checkpoints" / "step-00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    found = ck.latest_valid()
    assert found.step == 1
    assert [c.name for c in ck.skipped] == ["step-00000002"]
    assert any("__0_0.distcp" in p and "SHA-256" in p for p in ck.skipped[0].problems)

    assert cli(["ckpt", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "step-00000002: CORRUPT" in out and "__0_0.distcp: SHA-256 mismatch" in out
    assert "step-00000001: ok" in out

    # Saving that step again replaces the corrupt directory.
    state = make_state()
    ck.save(2, state)
    assert ck.latest_valid().step == 2 and not ck.skipped


def test_torn_and_truncated_are_skipped(tmp_path):
    ck, _, _ = save_steps(tmp_path, [1, 2, 3])
    d = tmp_path / "checkpoints"
    (d / "step-00000003" / MANIFEST).unlink()                     # torn: never committed
    with open(d / "step-00000002" / "train_state.json", "a") as f:  # truncated/extended file
        f.write(" ")
    (d / "step-00000004.tmp").mkdir()                             # a save in flight when killed
    assert ck.latest_valid().step == 1
    assert {c.name: c.status for c in ck.skipped} == {"step-00000003": "torn", "step-00000002": "corrupt"}


def test_retention_keep_last_and_keep_every(tmp_path):
    save_steps(tmp_path, range(1, 8), keep_last=2, keep_every=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000003", "step-00000006", "step-00000007"]


def _evil(marker: Path):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return Evil()


def test_malicious_metadata_refused_nothing_executed(tmp_path):
    ck, _, _ = save_steps(tmp_path, [1, 2])
    marker = tmp_path / "pwned"
    step_dir = tmp_path / "checkpoints" / "step-00000002"
    (step_dir / ".metadata").write_bytes(pickle.dumps(_evil(marker)))
    # The attacker also rewrites the manifest, so the hashes match: only safe loading stops it.
    write_manifest(step_dir, build_manifest(step_dir, 2))

    found = ck.latest_valid()
    assert found.step == 1
    assert "refused to load DCP metadata" in ck.skipped[0].problems[0]
    with pytest.raises(CheckpointError, match="refused to load DCP metadata"):
        ck.load(2, make_state(), verify=False)
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "functools.partial", "subprocess.Popen"])
def test_restricted_unpickler_refuses_globals(tmp_path, payload):
    module, name = payload.rsplit(".", 1)
    crafted = b"\x80\x04c" + f"{module}\n{name}\n".encode() + b"(X\x04\x00\x00\x00trueX\x00\x00\x00\x00tR."
    path = tmp_path / ".metadata"
    path.write_bytes(crafted)
    with pytest.raises(CheckpointError, match=f"{module}.{name} is not allowed"):
        load_metadata(path)
    with pytest.raises(pickle.UnpicklingError):
        RestrictedUnpickler(io.BytesIO(crafted)).load()


def test_non_tensor_items_load_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_evil(marker), buf)
    buf.seek(0)

    class Item:
        class dest_index:
            fqn = "optim.param_groups.x.lr"

    with pytest.raises(CheckpointError, match="refused to unpickle"):
        SafeLoadPlanner().load_bytes(Item, buf)
    assert not marker.exists()


def test_ckpt_ls_and_convert(tmp_path, capsys):
    _, state, _ = save_steps(tmp_path, [1, 2])
    assert cli(["ckpt", "ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "LATEST -> step-00000002" in out and "committed" in out

    out_file = tmp_path / "model.safetensors"
    assert cli(["ckpt", "convert", str(tmp_path), "--out", str(out_file)]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(out_file))
    expected = state.modules[0].state_dict()
    assert sorted(exported) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(exported[k], v)


def test_rng_written_on_another_device_type_is_skipped_with_a_note():
    from suanli.fault.checkpoint.state import capture_rng, restore_rng

    saved = capture_rng(None)
    expected = torch.rand(4)
    saved.update(device_type="cuda", device=saved["torch_cpu"])   # as a GPU rank would have written it
    torch.manual_seed(999)
    note = restore_rng(saved, None)
    assert note is not None and "written on cuda" in note
    assert torch.equal(torch.rand(4), expected)   # the host streams are restored regardless
