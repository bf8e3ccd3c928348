"""The HAL contract, run against every backend in suanli.backends.BACKENDS.

Backends whose hardware is absent are skipped with their probe's reason, so the same module
checks cpu on a laptop and cuda/npu/... on a cluster node. The identity checks at the end
need no device and run for all seven everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from suanli.backends import BACKENDS, Accelerator, DeviceHealth, apply_watchdog_env, backend_class

NAMES = list(BACKENDS)


@pytest.fixture(params=NAMES)
def acc(request) -> Accelerator:
    cls = backend_class(request.param)
    av = cls.probe()
    if not av.available:
        pytest.skip(f"{request.param}: {av.reason}")
    return cls()


def _reference_attention(q, k, v, causal):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[-2]
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=q.device), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ---- device ----

def test_devices(acc):
    assert acc.device_count() > 0
    acc.set_device(0)
    assert acc.current_device() == 0
    dev = acc.device(0)
    assert isinstance(dev, torch.device) and dev.type == acc.device_type
    assert isinstance(acc.device_name(0), str) and acc.device_name(0)
    acc.synchronize()
    acc.synchronize(0)


def test_memory_stats(acc):
    x = torch.ones(1024, 1024, device=acc.device(0))
    for stat in (acc.memory_allocated, acc.max_memory_allocated, acc.memory_reserved):
        v = stat(0)
        assert isinstance(v, int) and v >= 0
    assert isinstance(acc.total_memory(0), int) and acc.total_memory(0) > 0
    acc.reset_peak_memory_stats(0)
    del x
    acc.empty_cache()


def test_rng_roundtrip(acc):
    dev = acc.device(0)
    acc.manual_seed(1234)
    state = acc.get_rng_state()
    a = torch.randn(16, device=dev)
    acc.set_rng_state(state)
    b = torch.randn(16, device=dev)
    assert torch.equal(a, b)
    acc.manual_seed(7)
    c = torch.randn(16, device=dev)
    acc.manual_seed(7)
    assert torch.equal(c, torch.randn(16, device=dev))


def test_streams_and_events(acc):
    assert isinstance(acc.has_streams, bool)
    dev = acc.device(0)
    s, e = acc.Stream(), acc.Event()
    with acc.stream(s):
        y = torch.full((64,), 2.0, device=dev) * 3
        e.record()
    e.synchronize()
    assert acc.current_stream() is not None
    acc.synchronize()
    assert float(y.sum()) == 64 * 6.0


# ---- capabilities ----

def test_dtypes(acc):
    dtypes = acc.supported_dtypes()
    assert "fp32" in dtypes and set(dtypes) <= {"fp32", "bf16", "fp16", "fp8"}


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", torch.bfloat16])
def test_peak_flops(acc, dtype):
    v = acc.peak_flops(dtype)
    assert v is None or v > 0


def test_fused_adamw_steps(acc):
    dev = acc.device(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).to(dev)
    before = [p.detach().clone() for p in model.parameters()]
    opt = acc.fused_adamw(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(acc.fused_adamw_kind(), str) and acc.fused_adamw_kind()
    model(torch.randn(4, 16, device=dev)).pow(2).sum().backward()
    opt.step()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))


def test_health(acc):
    readings = acc.health()
    assert isinstance(readings, list) and readings
    for r in readings:
        assert isinstance(r, DeviceHealth)
        assert isinstance(r.index, int) and r.index >= 0
        assert r.temperature_c is None or -40 < r.temperature_c < 150
        assert r.power_w is None or 0 <= r.power_w < 5000
        assert r.utilization_pct is None or 0 <= r.utilization_pct <= 100
        for b in (r.memory_used_bytes, r.memory_total_bytes):
            assert b is None or (isinstance(b, int) and b >= 0)
        if r.memory_used_bytes is not None and r.memory_total_bytes is not None:
            assert r.memory_used_bytes <= r.memory_total_bytes
        for n in (r.ecc_errors_corrected, r.ecc_errors_uncorrected):
            assert n is None or (isinstance(n, int) and n >= 0)
        assert isinstance(r.source, str) and r.source
        assert r.as_dict()["index"] == r.index


# ---- kernels the model calls ----

@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_reference(acc, causal):
    dev = acc.device(0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g).to(dev) for _ in range(3))
    out = acc.attention(q, k, v, causal=causal)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _reference_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_reference(acc):
    dev = acc.device(0)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 64, generator=g).to(dev), torch.randn(64, generator=g).to(dev)
    eps = 1e-6
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    torch.testing.assert_close(acc.rms_norm(x, w, eps), ref, rtol=1e-5, atol=1e-5)
    if "bf16" in acc.supported_dtypes():
        out = acc.rms_norm(x.bfloat16(), w.bfloat16(), eps)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=5e-2)


# ---- identity: no device needed, so these run for every backend ----

@pytest.mark.parametrize("name", NAMES)
def test_identity_table(name):
    cls = backend_class(name)
    a = cls()  # constructing must not touch a device or import the vendor package
    assert a.name == name
    assert isinstance(a.comm_backend, str) and a.comm_backend
    assert isinstance(a.device_type, str) and a.device_type
    assert a.install_hint
    assert a.ray_resource
    if name != "cpu":
        assert a.visible_devices_env and a.visible_devices_env.isupper()
    for timeout in (None, 600.0):
        env = a.watchdog_env(timeout)
        assert isinstance(env, dict)
        assert all(isinstance(k, str) and isinstance(v, str) and k for k, v in env.items())


@pytest.mark.parametrize("name", NAMES)
def test_watchdog_env_respects_user_settings(name):
    a = backend_class(name)()
    env = a.watchdog_env(600.0)
    if not env:
        pytest.skip(f"{name} sets no watchdog variables")
    key = next(iter(env))
    environ = {key: "user-choice"}
    applied = apply_watchdog_env(a, environ, 600.0)
    assert environ[key] == "user-choice" and key not in applied
    assert all(environ[k] == v for k, v in applied.items())
