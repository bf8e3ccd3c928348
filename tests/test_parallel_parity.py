"""Loss parity: every layout trains the tiny model to the same per-step losses as one process.

fp32 on CPU: data parallel, tensor parallel and pipeline parallel only reorder sums, so the
first 10 losses must agree within 1e-4 relative. A layout that dropped a layer, double-counted
a gradient or mis-scaled micro-batches would be off by far more from step 2 on.
"""

import pytest

from conftest import json_lines, run_workers

REL = 1e-4

LAYOUTS = {
    # id: (processes, overrides)
    "tp2": (2, ["parallel.tp=2"]),
    "pp2-1f1b": (2, ["parallel.pp=2"]),
    "dp2-fsdp": (2, []),
    "dp2-ddp": (2, ["parallel.dp_replicate=2"]),
    "tp2-pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp2-dp2-fsdp": (4, ["parallel.tp=2"]),
    "pp2-dp2-fsdp": (4, ["parallel.pp=2"]),
    "pp2-dp2-replicated": (4, ["parallel.pp=2", "parallel.dp_replicate=2"]),
    "hsdp-2x2": (4, ["parallel.dp_replicate=2"]),
    "pp2-gpipe": (2, ["parallel.pp=2", 'parallel.pp_schedule="gpipe"']),
    "pp2-interleaved-1f1b": (2, ["parallel.pp=2", 'parallel.pp_schedule="interleaved-1f1b"']),
    "pp2-zbv": (2, ["parallel.pp=2", 'parallel.pp_schedule="zbv"']),
    "pp2-uneven-1-3": (2, ["parallel.pp=2", "parallel.pp_layers=[1,3]"]),
    "pp2-auto": (2, ["parallel.pp=2", 'parallel.pp_layers="auto"']),
    "ac-full": (1, ['parallel.activation_checkpoint="full"']),
    "ac-selective-tp2": (2, ["parallel.tp=2", 'parallel.activation_checkpoint="selective"']),
}


def train(nproc, overrides, tmp_path):
    out = run_workers("train_worker.py", nproc, tmp_path / "run", *overrides)
    (res,) = json_lines(out[0], "RESULT")
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(1, [], tmp_path_factory.mktemp("ref"))


def test_reference_learns(reference):
    losses = reference["losses"]
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    got = train(nproc, overrides, tmp_path)
    for step, (a, b) in enumerate(zip(got["losses"], reference["losses"]), start=1):
        assert abs(a - b) <= REL * abs(b), f"{layout}: step {step} loss {a} vs single-process {b}"
    assert len(got["losses"]) == len(reference["losses"])
    # The clipping norm must be the whole model's: shards (TP/FSDP) and stages (PP) summed.
    for step, (a, b) in enumerate(zip(got["grad_norms"], reference["grad_norms"]), start=1):
        assert abs(a - b) <= 1e-3 * abs(b), f"{layout}: step {step} grad norm {a} vs single-process {b}"
    if "pp_layers=[1,3]" in " ".join(overrides):
        assert got["stage_layers"] == [1, 3]
    if "interleaved" in layout or "zbv" in layout:
        assert got["stage_layers"] == [1, 1, 1, 1]
