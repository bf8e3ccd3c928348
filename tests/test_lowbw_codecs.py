"""Codecs, packing and schedules of suanli.infra.lowbw, in one process (no collectives)."""

import pytest
import torch

from suanli.infra.config import ConfigError, load_config
from suanli.infra.lowbw.codecs import FP8, BlockQuant, Residuals, make_codec
from suanli.infra.lowbw.diloco import fragments
from suanli.infra.lowbw.pipeline_compress import pack_rows_int8, unpack_rows_int8


def blocks_of(block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(block * 16, generator=g)
    x[: block] *= 1e-6              # tiny values: the scale must follow the block, not the tensor
    x[block: 2 * block] = 0.0       # an all-zero block must stay exactly zero (no 0/0)
    x[2 * block: 3 * block] = 0.0
    x[2 * block + 5] = -3.0         # one spike alone in its block
    x[3 * block: 4 * block] *= 1e4  # large values
    return x


@pytest.mark.parametrize("block", [32, 256])
def test_int8_error_is_within_half_a_step_per_block(block):
    q = BlockQuant("int8", block)
    x = blocks_of(block)
    err = (q.roundtrip(x) - x).abs().view(-1, block).amax(1)
    bound = x.view(-1, block).abs().amax(1) / 254
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-30), (err / bound).max()
    assert torch.equal(q.roundtrip(x)[block: 2 * block], torch.zeros(block))
    codes, scales = q.quantize(x)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() and scales.numel() == x.numel() // block
    assert q.wire_bytes(x.numel()) == x.numel() + 4 * x.numel() // block


@pytest.mark.parametrize("block", [32, 256])
def test_int4_packs_two_codes_a_byte_within_half_a_step(block):
    q = BlockQuant("int4", block)
    x = blocks_of(block)
    codes, scales = q.quantize(x)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() // 2 and scales.numel() == x.numel() // block
    assert q.wire_bytes(x.numel()) == x.numel() // 2 + 4 * x.numel() // block
    y = q.dequantize(codes, scales)
    err = (y - x).abs().view(-1, block).amax(1)
    assert torch.all(err <= x.view(-1, block).abs().amax(1) / 14 * (1 + 1e-5) + 1e-30)
    assert torch.equal(y[block: 2 * block], torch.zeros(block))
    assert y[2 * block + 5] == -3.0                          # the block's absmax is exact
    # a chunk of the packed codes is the codes of the same chunk of elements (what the
    # quantized reduce-scatter relies on when it splits the codes between ranks)
    half = x.numel() // 2
    assert torch.equal(q.dequantize(codes[half // 2:], scales[half // block:]), y[half:])


@pytest.mark.skipif(FP8 is None, reason="torch without float8_e4m3fn")
def test_fp8_error_is_within_its_relative_bound():
    q = BlockQuant("fp8", 64)
    x = blocks_of(64)
    err = (q.roundtrip(x) - x).abs().view(-1, 64).amax(1)
    assert torch.all(err <= q.error_bound(x) * (1 + 1e-5) + 1e-30)


def test_residuals_carry_the_dropped_part():
    r = Residuals(True)
    x = torch.tensor([1.0, 2.0])
    assert r.compensate("k", x) is x
    r.update("k", x, torch.tensor([1.0, 1.5]))
    assert torch.equal(r.compensate("k", torch.zeros(2)), torch.tensor([0.0, 0.5]))
    off = Residuals(False)
    off.update("k", x, torch.zeros(2))
    assert off.compensate("k", torch.zeros(2)).sum() == 0


@pytest.mark.parametrize("d", [128, 7])
def test_activation_rows_pack_to_int8_and_back(d):
    x = torch.randn(2, 3, d) * torch.tensor([1.0, 100.0, 1e-3]).view(1, 3, 1)
    p = pack_rows_int8(x)
    assert p.dtype == torch.bfloat16 and p.shape[:-1] == x.shape[:-1]
    assert p.numel() * 2 <= x.numel() + 5 * 6            # one byte per value + a 4-byte scale per row
    back = unpack_rows_int8(p, d)
    assert torch.all((back - x).abs() <= x.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5))


def test_codec_names_and_config_errors():
    assert make_codec("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown codec 'int2'"):
        make_codec("int2")
    # int4 is for DiLoCo's pseudo-gradients only (per-step gradients and FSDP shards stay 8-bit)
    assert load_config(None, ['comm.diloco_compress="int4"']).comm.diloco_compress == "int4"
    with pytest.raises(ConfigError, match="comm.grad: 'int4' is not one of"):
        load_config(None, ['comm.grad="int4"'])
    with pytest.raises(ConfigError, match="comm.diloco_compress"):
        load_config(None, ['comm.diloco_compress="powersgd"'])
    with pytest.raises(ConfigError, match="comm.quant_block: must be a multiple of 8"):
        load_config(None, ["comm.quant_block=100"])
    with pytest.raises(ConfigError, match='set comm.grad = "fp32" and compress the outer step'):
        load_config(None, ['comm.grad="int8"', "comm.diloco_inner_steps=10"])
    with pytest.raises(ConfigError, match="comm.pp_compress_boundaries"):
        load_config(None, ['comm.pp_compress_boundaries="all"'])
    with pytest.raises(ConfigError, match="comm.hierarchical"):
        load_config(None, ['comm.grad="powersgd"', "comm.hierarchical=true"])


def test_streaming_fragments_each_sync_every_h_steps_in_turn():
    from suanli.infra.lowbw.diloco import DiLoCo

    assert [len(r) for r in fragments(10, 3)] == [4, 3, 3]
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(6)]
    d = DiLoCo(params, reducer=None, inner_steps=6, n_fragments=3)
    due = {s: d.due(s) for s in range(1, 13)}
    assert sorted(s for s, f in due.items() if 0 in f) == [6, 12]
    assert sorted(s for s, f in due.items() if 1 in f) == [4, 10]
    assert sorted(s for s, f in due.items() if 2 in f) == [2, 8]
    assert all(len(f) <= 1 for f in due.values())  # never two fragments on the wire at once
