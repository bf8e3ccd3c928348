"""FLOPs conventions: hand-computed counts, PaLM's formula, HFU recomputation, MFU accounting."""

from __future__ import annotations

import pytest

from suanli.bench import hardware_flops_per_token, mfu, model_flops_per_token
from suanli.bench.flops import achieved_flops_per_device
from suanli.infra.model import ModelConfig, count_params, preset


def matmul_params(cfg: ModelConfig) -> int:
    """N of PaLM's 6N: count_params without the norm gains (2 per layer + the final one),
    which are parameters but no matmul."""
    return count_params(cfg) - (2 * cfg.n_layers + 1) * cfg.dim


def test_standard_model_equals_palm_formula():
    # Standard shape: no GQA, SwiGLU ffn = 8/3·d so the MLP holds 8·d² weights -> 12·d² per layer.
    cfg = ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, vocab_size=32000)
    L, H, Q, T, d, V = 12, 12, 64, 2048, 768, 32000
    n = matmul_params(cfg)
    assert n == 12 * L * d * d + d * V
    assert model_flops_per_token(cfg, T) == 6 * n + 12 * L * H * Q * T


@pytest.mark.parametrize("name", ["125m", "7b", "70b", "tiny", "1b"])
def test_palm_formula_holds_for_every_preset(name):
    # 6N + 12LHQT with N counted from the config is the same total for GQA and SwiGLU too,
    # as long as N counts what the model really multiplies by.
    cfg = preset(name)
    T = 1024
    expected = 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    assert model_flops_per_token(cfg, T) == expected


def test_gqa_counted_per_matmul():
    # d=64, 8 heads of 8, 2 kv heads -> k and v are 64x16 each, not 64x64.
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=128, vocab_size=100)
    T = 10
    forward = (
        2 * 64 * 64          # q
        + 2 * 64 * 16        # k (2 kv heads x head_dim 8)
        + 2 * 64 * 16        # v
        + 2 * 64 * 64        # o
        + 3 * 2 * 64 * 128   # SwiGLU: three 64x128 matrices
        + 2 * 2 * 8 * 8 * T  # scores and values: 8 heads x head_dim 8 x 10 keys, two matmuls
        + 2 * 64 * 100       # head
    )
    assert model_flops_per_token(cfg, T) == 3 * forward
    full_mha = ModelConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=8, ffn_dim=128, vocab_size=100)
    # Going from 2 to 8 kv heads adds exactly the extra k and v weights: 3 x 2 x (2 x 64 x 48).
    assert model_flops_per_token(full_mha, T) - model_flops_per_token(cfg, T) == 3 * 2 * (2 * 64 * 48)


def test_swiglu_counts_three_matrices():
    a = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=100)
    b = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=192, vocab_size=100)
    # +64 ffn units per layer = three more 64x64 blocks of weights, x2 FLOPs, x3 fwd+bwd, x2 layers.
    assert model_flops_per_token(b, 16) - model_flops_per_token(a, 16) == 2 * 3 * 2 * 3 * 64 * 64


def test_tied_head_still_counted():
    untied = ModelConfig(dim=64, n_layers=1, n_heads=4, ffn_dim=128, vocab_size=1000)
    tied = ModelConfig(dim=64, n_layers=1, n_heads=4, ffn_dim=128, vocab_size=1000, tie_embeddings=True)
    assert model_flops_per_token(tied, 32) == model_flops_per_token(untied, 32)


def test_tiny_preset_at_4096_by_hand():
    # tiny: dim 128, 4 layers, 4 heads (head_dim 32), 2 kv heads, ffn 384, vocab 512.
    per_layer = (
        2 * 128 * 128          # q
        + 2 * (2 * 128 * 64)   # k, v: 2 kv heads x 32 = 64 wide
        + 2 * 128 * 128        # o
        + 3 * (2 * 128 * 384)  # SwiGLU
        + 2 * 2 * 4 * 32 * 4096  # attention scores + values
    )
    forward = 4 * per_layer + 2 * 128 * 512  # + output head
    assert forward == 10_092_544
    assert model_flops_per_token(preset("tiny"), 4096) == 3 * forward == 30_277_632


def test_7b_preset_at_4096_by_hand():
    # LLaMA-2 7B: dim 4096, 32 layers, 32 heads of 128, no GQA, ffn 11008, vocab 32000.
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000
    assert n == 6_607_077_376
    attention = 12 * 32 * 32 * 128 * 4096
    assert model_flops_per_token(preset("7b"), 4096) == 6 * n + attention == 46_084_915_200


def test_causal_halving_halves_only_attention():
    cfg = preset("7b")
    attention = 12 * 32 * 32 * 128 * 4096
    full = model_flops_per_token(cfg, 4096)
    halved = model_flops_per_token(cfg, 4096, causal_halving=True)
    assert full - halved == attention / 2
    # the default is the PaLM convention: no halving
    assert model_flops_per_token(cfg, 4096) == model_flops_per_token(cfg, 4096, causal_halving=False)


def test_hardware_flops_recompute():
    cfg = preset("7b")
    T = 4096
    blocks_fwd = 2 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    attn_fwd = 4 * 32 * 32 * 128 * T
    model = model_flops_per_token(cfg, T)
    assert hardware_flops_per_token(cfg, T) == model
    assert hardware_flops_per_token(cfg, T, recompute="none") == model
    assert hardware_flops_per_token(cfg, T, recompute="full") == model + blocks_fwd + attn_fwd
    assert hardware_flops_per_token(cfg, T, recompute="selective") == model + attn_fwd
    assert hardware_flops_per_token(cfg, T, recompute="selective", causal_halving=True) == \
        model_flops_per_token(cfg, T, causal_halving=True) + attn_fwd / 2
    with pytest.raises(ValueError, match="parallel.activation_checkpoint"):
        hardware_flops_per_token(cfg, T, recompute="some")


def test_bad_seq_len():
    with pytest.raises(ValueError, match="train.seq_len"):
        model_flops_per_token(preset("tiny"), 0)


def test_mfu_unknown_peak_is_none():
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1000.0, 1e9, 0) is None
    assert mfu(1000.0, 1e9, -5.0) is None


def test_mfu_with_user_peak():
    # 2000 tokens/s x 6e10 FLOPs/token = 1.2e14 FLOP/s on a 312 TFLOP/s part.
    assert mfu(2000.0, 6e10, 312e12) == pytest.approx(1.2e14 / 312e12)
    assert mfu(0.0, 6e10, 312e12) == 0.0


@pytest.mark.parametrize("args", [(-1.0, 1e9, 1e12), (1.0, -1e9, 1e12), (float("nan"), 1e9, 1e12)])
def test_mfu_rejects_bad_inputs(args):
    with pytest.raises(ValueError):
        mfu(*args)


def test_per_device_vs_global_accounting():
    # dp=8: the job processes 80,000 tokens/s in total, 10,000 per device.
    f = model_flops_per_token(preset("7b"), 4096)
    per_device = achieved_flops_per_device(80_000.0, 8, f)
    assert per_device == 10_000.0 * f
    peak = 989e12
    assert mfu(80_000.0 / 8, f, peak) == pytest.approx(per_device / peak)
    # Feeding global throughput as if it were per device would overstate MFU 8x.
    assert mfu(80_000.0, f, peak) == pytest.approx(8 * mfu(10_000.0, f, peak))
    # tp=2 x dp=4 uses the same 8 devices: divide by the world size, not the dp size.
    assert achieved_flops_per_device(80_000.0, 2 * 4, f) == per_device
    with pytest.raises(ValueError):
        achieved_flops_per_device(80_000.0, 0, f)
