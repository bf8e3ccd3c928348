"""Fuzzing the daemon: random and truncated bytes, oversize messages and absurd field values
get an error status (never a crash or a hang), and the daemon keeps serving."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from suanli.fault.health import DetectorConfig, HealthClient, start_daemon
from suanli.fault.proto import health_pb2 as pb

SVC = "/suanli.health.v1.Health/"
OK, BAD, BIG = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
FUZZ = settings(max_examples=50, deadline=None, database=None,  # no .hypothesis/ in the repo
               suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    h = start_daemon("127.0.0.1:0", str(tmp_path_factory.mktemp("fuzz") / "h.db"), max_message_bytes=16 * 1024,
                     detectors=DetectorConfig(tick_s=0.1))
    yield h
    h.stop()


@pytest.fixture(scope="module")
def raw(daemon):
    ch = grpc.insecure_channel(daemon.address)
    calls = {name: ch.unary_unary(SVC + name) for name in ("ReportOnce", "ReportNode", "Status")}
    calls["Report"] = ch.stream_stream(SVC + "Report")
    calls["ReportBatch"] = ch.stream_stream(SVC + "ReportBatch")
    calls["Watch"] = ch.unary_stream(SVC + "Watch")
    yield calls
    ch.close()


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
        return OK
    except grpc.RpcError as e:
        return e.code()


def send_everywhere(raw, data: bytes) -> set:
    return {
        code_of(lambda: raw["ReportOnce"](data, timeout=10)),
        code_of(lambda: raw["ReportNode"](data, timeout=10)),
        code_of(lambda: raw["Status"](data, timeout=10)),
        code_of(lambda: list(raw["Watch"](data, timeout=10))),
        code_of(lambda: list(raw["Report"](iter([data, data]), timeout=10))),
        code_of(lambda: list(raw["ReportBatch"](iter([data, data]), timeout=10))),
    }


def still_serving(daemon) -> None:
    c = HealthClient(daemon.address)
    ok = pb.Heartbeat(job="canary", rank=0, node="n", pid=1, step=1)
    assert pb.ReportReply.FromString(grpc.insecure_channel(daemon.address).unary_unary(SVC + "ReportOnce")(
        ok.SerializeToString(), timeout=10)) is not None
    assert any(m.job == "canary" for m in c.status("canary").members)
    c.close()


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(daemon, raw, data):
    assert send_everywhere(raw, data) <= {OK, BAD}


@FUZZ
@given(st.integers(min_value=0, max_value=10_000), st.data())
def test_truncated_messages(daemon, raw, seed, data):
    hb = pb.Heartbeat(job="trunc", rank=seed % 64, node="n", pid=seed, step=seed, loss=1.0, run_dir="/r" * 50,
                      devices=[pb.DeviceHealth(index=0, name="dev", temperature_c=50.0)],
                      host=pb.HostMetrics(cpu_percent=1.0, disk_path="/"))
    blob = hb.SerializeToString()
    cut = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    assert send_everywhere(raw, blob[:cut]) <= {OK, BAD}


finite = st.floats(allow_nan=True, allow_infinity=True)


@FUZZ
@given(st.builds(
    pb.Heartbeat, job=st.text(max_size=300), rank=st.integers(-2**31, 2**31 - 1), world_size=st.integers(-2**31, 2**31 - 1),
    node=st.text(max_size=300), pid=st.integers(-2**31, 2**31 - 1), step=st.integers(-2**63, 2**63 - 1),
    phase=st.integers(-3, 50), loss=finite, step_time_s=finite, tokens_per_s=finite, mfu=finite,
    collectives=st.integers(-2**63, 2**63 - 1), nan_count=st.integers(-2**63, 2**63 - 1),
    devices=st.lists(st.builds(pb.DeviceHealth, index=st.integers(-5, 5), temperature_c=finite,
                               ecc_errors_uncorrected=st.integers(-2**63, 2**63 - 1)), max_size=80),
    host=st.builds(pb.HostMetrics, cpu_percent=finite, memory_used_bytes=st.integers(-2**63, 2**63 - 1),
                   disk_free_bytes=st.integers(-2**63, 2**63 - 1))))
def test_absurd_field_values(daemon, raw, hb):
    data = hb.SerializeToString()
    ok = pb.Heartbeat(job="fine", rank=0, node="n", pid=1)
    # A relay's batch with the absurd heartbeat among good ones: judged the same way.
    batch = pb.HeartbeatBatch(seq=1, heartbeats=[ok, hb, ok]).SerializeToString()
    codes = {code_of(lambda: raw["ReportOnce"](data, timeout=10)),
             code_of(lambda: list(raw["Report"](iter([data]), timeout=10)))}
    assert codes <= {OK, BAD, BIG}
    assert code_of(lambda: list(raw["ReportBatch"](iter([batch]), timeout=10))) in codes | {BIG}


def test_oversize_messages_and_the_daemon_keeps_serving(daemon, raw):
    big = pb.Heartbeat(job="big", rank=0, node="n", run_dir="x" * 100_000).SerializeToString()
    assert code_of(lambda: raw["ReportOnce"](big, timeout=10)) == BIG
    assert code_of(lambda: list(raw["Report"](iter([big]), timeout=10))) == BIG
    assert code_of(lambda: raw["ReportNode"](b"\x0a" + b"\xff" * 20_000, timeout=10)) == BIG
    many = pb.HeartbeatBatch(heartbeats=[pb.Heartbeat(job="big", rank=r, node="n") for r in range(2000)])
    assert code_of(lambda: list(raw["ReportBatch"](iter([many.SerializeToString()]), timeout=10))) == BIG
    still_serving(daemon)


@FUZZ
@given(st.lists(st.builds(pb.Heartbeat, job=st.sampled_from(["j", "", "a b"]), rank=st.integers(-3, 5),
                          world_size=st.integers(-1, 6), node=st.sampled_from(["n", "", "x y"]),
                          step=st.integers(-2, 2)), max_size=20),
       st.booleans())
def test_relay_batches_bad_anywhere_are_refused_whole(daemon, raw, hbs, with_node):
    batch = pb.HeartbeatBatch(seq=9, heartbeats=hbs, ack=True)
    if with_node:
        batch.node.CopyFrom(pb.NodeHeartbeat(node="fuzz-node", pid=1))
    from suanli.fault.health.validate import check_batch

    expect = BAD if check_batch(batch) else OK
    assert code_of(lambda: list(raw["ReportBatch"](iter([batch.SerializeToString()]), timeout=10))) == expect


def test_batch_error_names_the_heartbeat_and_field(daemon, raw):
    bad = pb.HeartbeatBatch(heartbeats=[pb.Heartbeat(job="ok", rank=0, node="n"),
                                        pb.Heartbeat(job="ok", rank=3, node="n", world_size=2)])
    with pytest.raises(grpc.RpcError) as e:
        list(raw["ReportBatch"](iter([bad.SerializeToString()]), timeout=10))
    assert e.value.code() == BAD
    assert "heartbeat_batch.heartbeats[1] (job 'ok', rank 3): heartbeat.rank=3: must be below world_size=2" \
        in e.value.details()
    too_many = pb.HeartbeatBatch(heartbeats=[pb.Heartbeat(job="ok", rank=0, node="n")] * 1025)
    with pytest.raises(grpc.RpcError) as e:
        list(raw["ReportBatch"](iter([too_many.SerializeToString()]), timeout=10))
    assert e.value.code() == BAD and "at most 1024" in e.value.details()
    still_serving(daemon)


def test_invalid_heartbeat_error_names_the_field(daemon, raw):
    bad = pb.Heartbeat(job="ok", rank=3, node="n", world_size=2).SerializeToString()
    with pytest.raises(grpc.RpcError) as e:
        raw["ReportOnce"](bad, timeout=10)
    assert e.value.code() == BAD and "heartbeat.rank=3: must be below world_size=2" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        raw["ReportOnce"](b"\xff\xff", timeout=10)
    assert e.value.code() == BAD and "malformed Heartbeat" in e.value.details()
    still_serving(daemon)
