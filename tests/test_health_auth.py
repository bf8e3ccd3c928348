"""Who may talk to the daemon: a missing or wrong token is UNAUTHENTICATED (stream, unary and
/metrics alike) and the daemon keeps serving; the standard health check stays open; a
non-loopback bind without a token is refused; TLS works end to end."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest

from suanli.cli import main as cli_main
from suanli.fault.health import DetectorConfig, HealthClient, HeartbeatReporter, start_daemon
from suanli.fault.proto import health_pb2 as pb
from suanli.fault.proto import health_pb2_grpc as pbg

TOKEN = "tok-3f9a1c"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    h = start_daemon("127.0.0.1:0", str(tmp_path_factory.mktemp("auth") / "h.db"), token=TOKEN,
                     metrics_bind="127.0.0.1:0", detectors=DetectorConfig(interval_s=0.2, tick_s=0.1))
    yield h
    h.stop()


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_rejected_and_daemon_keeps_serving(daemon, token):
    with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
        HealthClient(daemon.address, token).status()
    channel = grpc.insecure_channel(daemon.address)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    stream = pbg.HealthStub(channel).Report(iter([pb.Heartbeat(job="x", rank=0, node="n", ack=True)]), metadata=md)
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    assert not any(m.job == "x" for m in HealthClient(daemon.address, TOKEN).status().members)

    req = urllib.request.Request(f"http://{daemon.metrics_address}/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=10)
    assert http.value.code == 401


def test_right_token_works_and_health_check_needs_none(daemon):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with HeartbeatReporter(daemon.address, job="authed", rank=0, token=TOKEN, interval_s=0.1) as rep:
        deadline = time.monotonic() + 10
        while not rep.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rep.connected
    assert [m.state for m in HealthClient(daemon.address, TOKEN).status("authed").members] == ["done"]
    req = urllib.request.Request(f"http://{daemon.metrics_address}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert b"suanli_health_reports_total" in urllib.request.urlopen(req, timeout=10).read()
    with grpc.insecure_channel(daemon.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_non_loopback_bind_without_token_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="non-loopback address without a token"):
        start_daemon("0.0.0.0:0", str(tmp_path / "a.db"))
    with pytest.raises(ValueError, match="--metrics-bind"):
        start_daemon("127.0.0.1:0", str(tmp_path / "b.db"), metrics_bind="0.0.0.0:0")
    assert cli_main(["health", "serve", "--bind", "0.0.0.0:50999", "--db", str(tmp_path / "c.db")]) == 2
    assert "refusing to listen on a non-loopback address" in capsys.readouterr().err
    assert not (tmp_path / "a.db").exists(), "refused before touching anything"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_token(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with start_daemon("127.0.0.1:0", str(tmp_path / "t.db"), token=TOKEN, tls_cert=str(cert), tls_key=str(key)) as h:
        with HeartbeatReporter(h.address, job="tls", rank=0, token=TOKEN, tls_ca=str(cert), interval_s=0.1) as rep:
            deadline = time.monotonic() + 10
            while not rep.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rep.connected
        assert [m.job for m in HealthClient(h.address, TOKEN, tls_ca=str(cert)).status().members] == ["tls"]
        with pytest.raises(RuntimeError, match="UNAVAILABLE"):   # plaintext client against TLS
            HealthClient(h.address, TOKEN, timeout_s=2).status()
