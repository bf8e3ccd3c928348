"""The planner: memory estimates, ranking behaviour, topology files, and errors."""

import json

import pytest

from conftest import json_lines, run_workers
from suanli.cli import main as cli_main
from suanli.infra.config import load_config
from suanli.infra.model import count_params, preset
from suanli.infra.planner import (GiB, Job, Layout, Link, Topology, activation_values_per_token, collective_counts,
                                  fit_alpha_beta, hardware, make_job, memory, plan, predict, read_topology,
                                  stage_params, topology_from_dict, write_topology)


def h100(inter_gbps, dpn=8):
    return hardware("h100", dpn, 3600.0, inter_gbps)


def test_memory_of_known_configs():
    cfg = preset("7b")
    n = count_params(cfg, exclude_embedding=False)
    assert stage_params(cfg, 1, 1) == n                        # every parameter, embeddings included
    assert 6.6e9 < n < 6.8e9                                   # LLaMA-2 7B: 6.74B
    job = Job(cfg, 64, seq_len=4096, global_batch=512)
    ddp = Layout(1, 1, 64, "ddp", 1, 1, 8, "full", "fp32")
    assert memory(job, ddp)["states"] == 20 * n                # fp32 weights, grads, 2 Adam moments + DDP buckets
    fsdp = Layout(1, 1, 64, "fsdp", 64, 1, 8, "full", "fp32")
    # sharded states + two unsharded layers in flight (bf16 weights, fp32 grads) + the root
    # unit's bf16 embedding and head, which stay gathered
    layer = (n - 2 * cfg.vocab_size * cfg.dim - cfg.dim) / cfg.n_layers
    expected = 16 * n / 64 + 2 * layer * (2 + 4) + 2 * cfg.vocab_size * cfg.dim * 2
    assert memory(job, fsdp)["states"] == pytest.approx(expected, rel=1e-6)
    # Activations per layer: within 35% of Korthikanti et al.'s 34·s·b·h for a GPT layer
    # (this model keeps q/k before RoPE and SwiGLU's extra matrix).
    ours = activation_values_per_token(cfg, "none") * 2
    assert 1.0 <= ours / (34 * cfg.dim) <= 1.35
    assert activation_values_per_token(cfg, "full") == cfg.dim
    # 7B: DDP can never fit on 80 GB; FSDP over 8 H100s does.
    ranked = plan(make_job("7b", 8, 4096, 64), h100(400.0))
    assert ranked and all(p.layout.dp_kind != "ddp" for p in ranked)
    assert all(p.memory["total"] <= 0.9 * 80 * GiB for p in ranked)
    # 70B on 8 devices: 16 B/param sharded 8 ways is 140 GB: nothing without tp/pp fits
    assert not [p for p in plan(make_job("70b", 8, 4096, 64), h100(400.0)) if p.layout.tp == p.layout.pp == 1]


def test_low_inter_node_bandwidth_keeps_tp_inside_nodes_and_goes_pp_dp_across():
    job = make_job("70b", 64, 4096, 512)
    slow, fast = plan(job, h100(10.0, dpn=4)), plan(job, h100(100_000.0, dpn=4))
    assert all(p.layout.tp <= 4 for p in slow[:10])           # TP never crosses a slow node boundary
    assert slow[0].layout.pp > 1                               # pipeline stages across nodes instead
    assert fast[0].layout.pp == 1                              # with fast links, no bubble is worth paying
    assert any(p.layout.tp > 4 for p in fast[:10])             # and TP may span nodes
    assert fast[0].time["step"] < slow[0].time["step"]
    # A 7B job across 25 Gb/s Ethernet compresses its gradients; across 3.2 Tb/s it need not.
    j7 = make_job("7b", 64, 4096, 512)
    assert plan(j7, h100(25.0))[0].layout.comm != "fp32"
    assert plan(j7, h100(3200.0))[0].layout.comm == "fp32"


def test_suggested_toml_is_a_valid_config(tmp_path, capsys):
    assert cli_main(["plan", "--model", "7b", "--devices", "16", "--device-type", "h100", "--intra-gbps", "3600",
                     "--inter-gbps", "100", "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ranked"]) == 3 and out["hardware"] == "H100 SXM"
    steps = [r["time_s"]["step"] for r in out["ranked"]]
    assert steps == sorted(steps)
    path = tmp_path / "best.toml"
    path.write_text(out["toml"])
    cfg = load_config(path)
    lay = out["ranked"][0]["layout"]
    assert (cfg.parallel.tp, cfg.parallel.pp) == (lay["tp"], lay["pp"])
    assert cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp_replicate * cfg.parallel.dp_shard == 16


@pytest.mark.parametrize("argv, message", [
    (["--device-type", "h900"], "--device-type: 'h900' matches no known device"),
    (["--model", "8b"], "--model: model.preset: unknown preset '8b'"),
    (["--devices", "12"], "--devices: 12 is not a whole number of nodes of --devices-per-node 8"),
    (["--inter-gbps", "0"], "--inter-gbps: must be > 0"),
    (["--seq-len", "100000"], "--seq-len: 100000 must be in 1..4096"),
    (["--devices", "1", "--model", "70b"], "no layout fits 1 x H100 SXM"),
    (["--topology", "/nonexistent.json"], "--topology: '/nonexistent.json' not found"),
])
def test_bad_arguments_give_one_clear_error(argv, message, capsys):
    base = {"--model": "7b", "--devices": "16", "--device-type": "h100", "--intra-gbps": "3600",
            "--inter-gbps": "25"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    args = ["plan"] + [x for kv in base.items() for x in kv]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_topology_file_roundtrip_and_errors(tmp_path):
    topo = Topology(Link(5e-6, 3600.0), Link(2e-5, 25.0), 8)
    path = tmp_path / "t.json"
    write_topology(topo, path)
    back = read_topology(path)
    assert back.inter == Link(2e-5, 25.0) and back.devices_per_node == 8
    hw = hardware("h100", 8, None, None, topology=back)
    assert hw.inter.bandwidth_gbps == 25.0 and hw.intra.alpha_s == 5e-6
    bad = json.loads(path.read_text())
    bad["links"]["inter_node"]["bandwidth_gbps"] = -1
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="links.inter_node.bandwidth_gbps: expected a positive number"):
        read_topology(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a suanli topology file"):
        read_topology(path)


def test_alpha_beta_fit_recovers_a_known_link():
    alpha, gbps, n = 30e-6, 80.0, 4
    beta = 8 / (gbps * 1e9)
    samples = [(s, 2 * (n - 1) * alpha + 2 * (n - 1) / n * s * beta) for s in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    link = fit_alpha_beta(samples, n)
    assert link.alpha_s == pytest.approx(alpha, rel=1e-3) and link.bandwidth_gbps == pytest.approx(gbps, rel=1e-3)


def test_probe_topology_on_two_processes(tmp_path):
    path = tmp_path / "topo.json"
    (res,) = json_lines(run_workers("lowbw_probe_worker.py", 2, path)[0], "RESULT")
    # node_size=1: each rank its own "node", so the link measured is the inter-node one
    assert res["devices_per_node"] == 1 and "inter_node" in res["links"]
    topo = read_topology(path)
    assert topo.inter.bandwidth_gbps > 0 and topo.inter.alpha_s >= 0
    assert len(topo.measured["inter_node"]["samples"]) == 3


@pytest.mark.parametrize("name", ["dp2 fsdp fp32", "tp2"])
def test_collectives_per_step_match_a_real_two_process_gloo_run(name):
    """The planner's inventory (calls per step by kind) against what 2 gloo processes running
    that layout really issue in one step, counted by plan_validate's dispatch-mode counter."""
    from suanli.bench.plan_validate import BASE, CASES, _launch, layout_of

    case = next(c for c in CASES if c.name == name)
    t = load_config(None, BASE).train
    got = _launch({"overrides": case.overrides, "steps": 1}, case.nproc)["collectives"]
    job = Job(preset("tiny"), case.nproc, t.seq_len, t.global_batch, "fp32")
    want = {k: round(v) for k, v in collective_counts(job, layout_of(case, t.micro_batch, t.global_batch)).items()}
    assert got == want
    assert (want["all_gather"], want["reduce_scatter"]) == ((40, 5) if case.dp_kind == "fsdp" else (144, 144))


def _cpu_like(topo_kinds: dict | None = None, overlap: float = 1.0):
    from suanli.infra.planner import Hardware

    link = Link(100e-6, 10.0)
    return Hardware("cpu", 5e10, 1e12, 2, link, link, overlap, kinds={"intra_node": topo_kinds or {}})


def test_per_kind_latency_and_overlap_efficiency_drive_the_prediction():
    job = Job(preset("tiny"), 2, 128, 16, "fp32")
    fsdp = Layout(1, 1, 2, "fsdp", 2, 2, 4, "none", "fp32")
    tp = Layout(2, 1, 1, "none", 1, 2, 8, "none", "fp32")
    ddp = Layout(1, 1, 2, "ddp", 1, 2, 4, "none", "fp32")
    base = {lay: predict(job, lay, _cpu_like(overlap=0.0)).time for lay in (fsdp, tp, ddp)}
    # A slow in-step all-gather (as gloo on busy shared cores shows) costs each call its alpha:
    # FSDP's 40 gathers and TP's 144 per step pay it, in proportion.
    slow = _cpu_like({"all_gather": Link(5e-3, 10.0)}, overlap=0.0)
    for lay, calls in ((fsdp, 40), (tp, 144)):
        extra = predict(job, lay, slow).time["step"] - base[lay]["step"]
        assert extra == pytest.approx(calls * (5e-3 - 100e-6), rel=0.02)
    assert predict(job, ddp, slow).time["step"] == pytest.approx(base[ddp]["step"])   # DDP gathers nothing
    # Overlap is the backend's: full efficiency hides DDP's buckets behind backward, none hides nothing.
    hidden = predict(job, ddp, _cpu_like(overlap=1.0)).time
    assert hidden["dp_comm"] < base[ddp]["dp_comm"] and base[ddp]["dp_comm"] > 0


def test_oversubscribed_cpu_host_reclaims_waits_not_bytes():
    """4 processes on 2 cores: a waiting rank's core goes to the others, so the pipeline bubble
    and collective latency cost nothing; the bytes (CPU work) still do. Accelerators: no change."""
    job = Job(preset("tiny"), 4, 128, 16, "fp32")
    pp_dp = Layout(1, 2, 2, "fsdp", 2, 2, 4, "none", "fp32")
    own = _cpu_like(overlap=0.0)
    own.devices_per_node = 4
    shared = _cpu_like(overlap=0.0)
    shared.devices_per_node, shared.cores_per_node = 4, 2
    a, b = predict(job, pp_dp, own).time, predict(job, pp_dp, shared).time
    assert a["bubble"] > 0 and b["bubble"] == 0
    assert 0 < b["pp_comm"] < a["pp_comm"] and 0 < b["dp_comm"] < a["dp_comm"]
    assert b["compute"] == a["compute"]
    enough = _cpu_like(overlap=0.0)
    enough.devices_per_node, enough.cores_per_node = 4, 4       # one core per process: nothing shared
    assert predict(job, pp_dp, enough).time == a


def test_topology_per_kind_fields_roundtrip_and_errors(tmp_path):
    topo = Topology(Link(5e-6, 3600.0), Link(2e-5, 25.0), 8, kinds={"inter_node": {"all_gather": Link(4e-5, 20.0)}},
                    overlap_efficiency=0.3)
    path = tmp_path / "t.json"
    write_topology(topo, path)
    back = read_topology(path)
    assert back.kinds == topo.kinds and back.overlap_efficiency == 0.3
    hw = hardware("h100", 8, None, None, topology=back)
    assert hw.link(True, "all_gather") == Link(4e-5, 20.0) and hw.link(True, "all_reduce") == Link(2e-5, 25.0)
    assert hw.overlap_efficiency == 0.3
    # a flag that overrides the inter-node bandwidth retires that class's measured per-kind figures
    assert hardware("h100", 8, None, 50.0, topology=back).link(True, "all_gather").bandwidth_gbps == 50.0
    d = topo.to_dict()
    for key, value, message in ((("collectives", "inter_node", "gather"), {}, "collectives.inter_node.gather: unknown"),
                                (("overlap_efficiency",), 1.5, "overlap_efficiency: expected a number in \\[0, 1\\]")):
        bad = json.loads(json.dumps(d))
        target = bad
        for k in key[:-1]:
            target = target[k]
        target[key[-1]] = value
        with pytest.raises(ValueError, match=message):
            topology_from_dict(bad)


def test_7b_on_h100s_over_ethernet_keeps_tp_inside_nodes():
    ranked = plan(make_job("7b", 64, 4096, 512), hardware("h100", 8, 900.0, 25.0))
    assert all(p.layout.tp <= 8 for p in ranked[:10])          # no TP group leaves its node
    assert all(p.layout.pp * p.layout.dp >= 8 for p in ranked[:10])   # the 8 nodes are spanned by PP/DP
    # blocking TP collectives are counted per micro-batch: a layout's TP time grows with them
    tp2 = next(p for p in ranked if p.layout.tp == 2)
    assert tp2.time["tp_comm"] > 0 and ranked[0].time["step"] <= tp2.time["step"]
