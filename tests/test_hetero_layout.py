"""Heterogeneous jobs without processes: the [hetero] config and its errors, the plan
(rows, micro-batches, boundary messages), balancing, the predicted bubble, group specs,
bridge codecs, and the emulated test accelerator."""

import time

import pytest
import torch

from suanli.infra.config import ConfigError, load_config, to_toml
from suanli.infra.hetero.balance import balanced_layers, simulate
from suanli.infra.hetero.bridge import make_codec
from suanli.infra.hetero.groups import group_specs, norm_partition
from suanli.infra.hetero.layout import HeteroPlan, LayoutError, parse_groups, split_rows
from suanli.infra.model import preset
from suanli.infra.pipeline import layer_costs, split_layers

BASE = ["train.seq_len=64", "train.global_batch=8", "train.micro_batch=2", "hetero.emulated=true"]
TWO = 'hetero.groups=[{device="cpu", ranks=[0,1], tp=2, stages=[0]}, {device="cpu-emulated", ranks=[2,3], stages=[1]}]'


def test_toml_groups_round_trip(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("""
[train]
seq_len = 64
[hetero]
emulated = true
balance = "measure"
[[hetero.groups]]
device = "cpu"
ranks = "0-3"
tp = 2
stages = [0, 1]
[[hetero.groups]]
device = "cpu-emulated"
ranks = [4, 5]
stages = [2, 3]
micro_batch = 1
""")
    cfg = load_config(path)
    assert cfg.hetero.groups[0]["ranks"] == "0-3" and cfg.hetero.balance == "measure"
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert load_config(again).hetero == cfg.hetero
    groups = parse_groups(cfg.hetero.groups)
    assert groups[0].ranks == (0, 1, 2, 3) and groups[0].dp == 1 and groups[1].dp == 1 and groups[1].micro_batch == 1


BAD = {
    "stage gap": ('hetero.groups=[{device="cpu", ranks=[0], stages=[0]}, {device="cpu", ranks=[1], stages=[2]}]',
                  "no group runs stage(s) [1]"),
    "indivisible": ('hetero.groups=[{device="cpu", ranks=[0,1,2], tp=2, stages=[0]}]', "not divisible by"),
    "dp mismatch": ('hetero.groups=[{device="cpu", ranks=[0,1,2,3], dp=3, stages=[0]}]', "fix dp"),
    "unknown device": ('hetero.groups=[{device="tpu", ranks=[0], stages=[0]}]', "not a known accelerator"),
    "emulated off": ('hetero.groups=[{device="cpu-emulated", ranks=[0], stages=[0]}]', "hetero.emulated = true"),
    "rank twice": ('hetero.groups=[{device="cpu", ranks=[0,1], stages=[0]}, {device="cpu", ranks=[1], stages=[1]}]',
                   "already in hetero.groups[0]"),
    "rank gap": ('hetero.groups=[{device="cpu", ranks=[0], stages=[0]}, {device="cpu", ranks=[2], stages=[1]}]',
                 "belong to no group"),
    "tp vs heads": ('hetero.groups=[{device="cpu", ranks=[0,1,2], tp=3, stages=[0]}]', "hetero.groups[0].tp"),
    "stages order": ('hetero.groups=[{device="cpu", ranks=[0,1], stages=[1,0]}]', "consecutive"),
    "unknown key": ('hetero.groups=[{device="cpu", ranks=[0], stages=[0], pp=2}]', "unknown key(s) ['pp']"),
    "no ranks": ('hetero.groups=[{device="cpu", stages=[0]}]', "exactly one of ranks"),
    "some speeds": ('hetero.groups=[{device="cpu", ranks=[0], stages=[0], speed=2.0}, '
                    '{device="cpu", ranks=[1], stages=[1]}]', "hetero.groups[1].speed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_groups_name_the_field(case):
    setting, message = BAD[case]
    extra = ["hetero.emulated=false"] if case == "emulated off" else []
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + extra + [setting])
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("extra,message", [
    (["parallel.tp=2"], "parallel.tp"),
    (['hetero.balance="fast"'], "hetero.balance"),
    (['hetero.bridge_compress="zip"'], "hetero.bridge_compress"),
    (["hetero.layers=[1,2]"], "hetero.layers"),
    (["train.global_batch=1", "train.micro_batch=1"], "cannot feed"),
    (['comm.grad="bf16"'], "hetero.bridge_compress"),
])
def test_bad_settings_name_the_field(extra, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + [TWO] + extra)
    assert message in str(e.value), str(e.value)


def test_groups_by_node_list():
    from suanli.infra.hetero.layout import resolve_nodes

    raw = [dict(device="cuda", nodes=["gpu-a"], tp=2, stages=[0]), dict(device="npu", nodes=["npu-a"], stages=[1])]
    groups = resolve_nodes(parse_groups(raw), ["gpu-a", "gpu-a", "npu-a", "npu-a", "npu-a"])
    assert [(g.ranks, g.dp) for g in groups] == [((0, 1), 1), ((2, 3, 4), 3)]
    with pytest.raises(LayoutError, match="no rank runs on"):
        resolve_nodes(parse_groups(raw), ["gpu-a", "gpu-a"])


def test_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "hetero.toml")
    groups = parse_groups(cfg.hetero.groups)
    assert [(g.device, g.tp, g.dp, g.stages) for g in groups] == [("cuda", 4, 1, (0, 1)), ("npu", 2, 2, (2, 3))]


def test_unequal_tp_replicas_need_checkpoints_off():
    dp = 'hetero.groups=[{device="cpu", ranks=[0,1], tp=2, stages=[0]}, {device="cpu-emulated", ranks=[2], stages=[0]}]'
    with pytest.raises(ConfigError, match="different tp"):
        load_config(None, BASE + [dp])
    load_config(None, BASE + [dp, "checkpoint.every_steps=0"])


def test_absent_device_is_a_clear_error_at_start(monkeypatch):
    """A group whose device type this host lacks fails on every rank with the field named
    (build_hetero gathers every rank's verdict first, so no rank is left waiting)."""
    from suanli.infra.hetero import build

    monkeypatch.setattr(build, "_gather", lambda obj: [obj])
    (group,) = parse_groups([dict(device="npu", ranks=[0], stages=[0])])
    with pytest.raises(LayoutError) as e:
        build._accelerator(group, rank=0, local_rank=0)
    assert "hetero.groups[0].device: 'npu' is not usable on rank 0" in str(e.value)
    assert "torch_npu" in str(e.value)


# ---------------------------------------------------------------- the plan


def plan_of(groups, layers=None, batch=8, seq=64, mb=2, weights=None):
    gs = parse_groups(groups)
    n = max(g.stages[-1] for g in gs) + 1
    return HeteroPlan(gs, n, layers or [1] * n, batch, seq, weights or {}, mb)


LAYOUTS = {
    "tp2->tp1x2": [dict(device="cpu", ranks=[0, 1], tp=2, stages=[0]), dict(device="cpu", ranks=[2, 3], stages=[1])],
    "tp1->tp4": [dict(device="cpu", ranks=[0], stages=[0]), dict(device="cpu", ranks=[1, 2, 3, 4], tp=4, stages=[1])],
    "tp4->tp2 mb": [dict(device="cpu", ranks=list(range(8)), tp=4, stages=[0, 1], dp=1, micro_batch=1),
                    dict(device="cpu", ranks=[8, 9], tp=2, stages=[2], micro_batch=4)],
    "tp2->two holders": [dict(device="cpu", ranks=[0, 1], tp=2, stages=[0]),
                         dict(device="cpu", ranks=[2], stages=[1]), dict(device="cpu", ranks=[3], stages=[1],
                                                                          micro_batch=3)],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_element_crosses_each_boundary_exactly_once(name):
    plan = plan_of(LAYOUTS[name], weights={1: 1.0, 2: 2.0})
    for b in range(plan.n_stages - 1):
        msgs = plan.boundary(b)
        assert [m.index for m in msgs] == list(range(len(msgs)))
        for side, stage in (("src", b), ("dst", b + 1)):
            for rank in plan.stage_ranks(stage):
                role = plan.role(rank)
                cover = torch.zeros(plan.global_batch, plan.seq_len, dtype=torch.int)
                for m in msgs:
                    if getattr(m, side) == rank:
                        cover[m.rows[0]:m.rows[1], m.cols[0]:m.cols[1]] += 1
                want = torch.zeros_like(cover)
                want[role.replica.lo:role.replica.hi, role.cols[0]:role.cols[1]] = 1
                assert torch.equal(cover, want), (name, side, rank)
                micro = [m.src_micro if side == "src" else m.dst_micro for m in msgs if getattr(m, side) == rank]
                assert micro == sorted(micro), "each rank's messages must come in micro-batch order"


def test_rows_follow_weights_and_micro_batches_are_ragged_at_most_at_the_end():
    assert split_rows(8, [1, 1, 1], "x") == [3, 3, 2]
    assert split_rows(12, [2, 1], "x") == [8, 4]
    assert split_rows(3, [100, 1, 1], "x") == [1, 1, 1]
    plan = plan_of(LAYOUTS["tp2->two holders"], weights={1: 1.0, 2: 3.0})
    reps = plan.replicas[1]
    assert [(r.lo, r.hi) for r in reps] == [(0, 2), (2, 8)]
    assert reps[1].micro == ((2, 5), (5, 8))


def test_balancing_gives_a_slow_stage_fewer_layers():
    costs = layer_costs(preset("tiny"), 64)
    assert balanced_layers(4, [1.0, 0.5], costs) == [3, 1]
    assert balanced_layers(8, [0.5, 1.0], costs)[0] < 4
    # Equal capacities: the same split as the homogeneous "auto" planner.
    assert balanced_layers(8, [1.0] * 4, costs) == split_layers(8, 4, "auto", costs)


def test_simulated_gpipe_bubble_matches_the_textbook_formula():
    gs = [dict(device="cpu", ranks=[0], stages=[0]), dict(device="cpu", ranks=[1], stages=[1])]
    plan = plan_of(gs, layers=[1, 1], batch=8, mb=2)
    pred = simulate(plan, {0: 1.0, 1: 1.0}, (0.0, 1.0, 0.0))
    assert pred.bubble == pytest.approx((2 - 1) / (4 + 2 - 1))
    # Halve stage 1's speed: uniform layers leave stage 0 idle; more layers there fill it.
    slow = {0: 1.0, 1: 2.0}
    uniform = simulate(plan_of(gs, layers=[2, 2]), slow, (0.0, 1.0, 0.0))
    balanced = simulate(plan_of(gs, layers=[3, 1]), slow, (0.0, 1.0, 0.0))
    assert balanced.step_s < uniform.step_s and balanced.bubble < uniform.bubble


def test_no_vendor_group_spans_device_groups():
    plan = plan_of(LAYOUTS["tp2->two holders"])
    for spec in group_specs(plan):
        if spec.owner is not None:  # a vendor-backend group: inside its device group
            assert set(spec.ranks) <= set(plan.groups[spec.owner].ranks) and not plan.crosses(spec.ranks), spec
        elif spec.purpose in ("bridge-pp", "bridge-dp"):
            assert plan.crosses(spec.ranks), spec
    purposes = {s.purpose for s in group_specs(plan) if s.owner is None}
    assert purposes == {"bridge-pp", "bridge-dp", "bridge-norm"}
    assert norm_partition(plan) == [[0, 2], [1, 3]]
    # Data parallelism kept inside one vendor needs no gradient bridge.
    assert "bridge-dp" not in {s.purpose for s in group_specs(plan_of(LAYOUTS["tp2->tp1x2"]))}


def test_trainer_norm_group_needs_equal_ranks_per_stage():
    from types import SimpleNamespace

    from suanli.infra.hetero.build import HeteroContext

    plan = plan_of(LAYOUTS["tp1->tp4"])
    assert norm_partition(plan) is None
    ctx = HeteroContext(plan, plan.role(0), SimpleNamespace(norm=None), None, torch.device("cpu"), 0, 0, 5, None)
    with pytest.raises(ValueError, match="clip_grad_norm_"):
        ctx.group("pp")


@pytest.mark.parametrize("name", ["none", "bf16", "int8"])
def test_bridge_codecs(name):
    codec = make_codec(name)
    x = torch.randn(2, 16, 128)
    wire = codec.encode(x)
    shape, dtype = codec.wire(tuple(x.shape), x.dtype)
    assert tuple(wire.shape) == shape and wire.dtype == dtype
    back = codec.decode(wire, tuple(x.shape), x.dtype)
    bound = {"none": 0.0, "bf16": 2 ** -8, "int8": 1 / 127}[name]
    assert ((back - x).abs() <= bound * x.abs().amax(-1, keepdim=True) + 1e-7).all()
    ratio = wire.numel() * wire.element_size() / (x.numel() * 4)
    assert ratio == pytest.approx({"none": 1.0, "bf16": 0.5, "int8": (128 + 4) / (4 * 128)}[name])


# ---------------------------------------------------------------- the emulated accelerator


def test_emulated_accelerator_is_never_selected_automatically(monkeypatch):
    from suanli import backends
    from suanli.backends import emulated

    assert emulated.NAME not in backends.PROBE_ORDER
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    emulated.register()
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.reset_selection()
    try:
        assert backends.get_accelerator().name != emulated.NAME
        assert backends.get_accelerator(emulated.NAME).name == emulated.NAME
    finally:
        backends.reset_selection()


def test_emulated_slowdown(monkeypatch):
    from suanli.backends.emulated import EmulatedAccelerator, slowdown_from_env

    monkeypatch.setenv("SUANLI_EMULATED_SLOWDOWN", "0.5")
    with pytest.raises(ValueError, match="must be >= 1"):
        slowdown_from_env()
    acc = EmulatedAccelerator(slowdown=3.0)
    start = time.perf_counter()
    with acc.compute_span():
        busy = time.perf_counter() + 0.02
        while time.perf_counter() < busy:
            pass
    took = time.perf_counter() - start
    assert took >= 3 * 0.02 * 0.95 and acc.slept_s >= 2 * 0.02 * 0.95
    assert acc.busy_extra_s > 0
