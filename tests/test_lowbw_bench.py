"""`suanli bench lowbw` without running it: argument checks, the root requirement, and the
report (best option, speedups, plot) from a made-up result."""

import pytest

from suanli.bench import lowbw


def test_bad_arguments_and_missing_root_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="--rate: '100mbps' is not a tc rate"):
        lowbw.check_environment(lowbw.Spec(rate="100mbps"))
    with pytest.raises(ValueError, match="--options: unknown \\['zip'\\]"):
        lowbw.check_environment(lowbw.Spec(options=["fp32", "zip"]))
    monkeypatch.setattr(lowbw.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match="needs root \\(CAP_NET_ADMIN\\)"):
        lowbw.check_environment(lowbw.Spec())


def fake(option, wall, loss):
    return {"option": option, "path": option, "wall_s": wall, "wire_bytes": 1e6, "payload_bytes_rank0": 5e5,
            "final_loss": loss, "curve": [[0.0, 6.0], [wall, loss]],
            "phases_s": {k: wall / len(lowbw.PHASES) for k in lowbw.PHASES}}


def test_report_picks_the_fastest_option_within_3_percent(tmp_path):
    results = [fake("fp32", 200.0, 2.00), fake("int8", 100.0, 2.00), fake("powersgd", 20.0, 2.10),
               fake("diloco-int8", 25.0, 2.05), fake(lowbw.FLOOR, 15.0, 2.20)]
    base = results[0]
    for r in results:
        r["speedup_vs_fp32"] = base["wall_s"] / r["wall_s"]
        r["loss_vs_fp32"] = (r["final_loss"] - base["final_loss"]) / base["final_loss"]
    report = {"rate": "100mbit", "steps": 300, "tokens": 38400, "config": lowbw.BASE, "options": {},
              "load_avg": (1.0, 1.0, 1.0), "cpu_count": 2, "results": results}
    best = lowbw.best_option(report)
    assert best["option"] == "diloco-int8"          # powersgd is faster but 5% worse; the floor is no option
    text = lowbw.format_report(report)
    assert "**diloco-int8**, 8.0x faster" in text and "at most 13.3x" in text
    assert "| diloco-int8 | 5.0 | 5.0 | 5.0 | 5.0 | 5.0 |" in text          # where the time went
    stem = lowbw.write_results(report, tmp_path)
    assert stem.with_suffix(".png").stat().st_size > 1000 and stem.with_suffix(".json").exists()
