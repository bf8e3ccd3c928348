"""FLOPs per token and MFU, by stated conventions.

Conventions (every number suanli reports as MFU uses exactly these):

- A matmul of (m×k)·(k×n) costs 2·m·k·n FLOPs (one multiply + one add per term).
- Only matmuls are counted. Embedding lookups are free; norms, RoPE, softmax, SwiGLU's
  elementwise product, residual adds and the loss are ignored (they are memory-bound and
  under 1% of the work at these shapes).
- Forward FLOPs per token per layer, with d = dim, Q = head_dim, H = n_heads,
  G = n_kv_heads, f = ffn_dim, T = seq_len:
      q projection        2·d·(H·Q)              (= 2·d² for the reference model)
      k and v projections 2 · 2·d·(G·Q)          (grouped-query attention: G heads, not H)
      o projection        2·(H·Q)·d
      SwiGLU              3 · 2·d·f              (gate, up and down: three matrices)
      attention           2·2·H·Q·T              (scores q·kᵀ over T keys, then p·v)
  plus the output head 2·d·V once per token (counted even when tied to the embedding:
  the matmul happens either way).
- Training (model FLOPs) = 3 × forward: the backward pass costs two forwards (gradients
  with respect to activations and to weights).
- Attention is counted over the full T×T score matrix, not halved for the causal mask
  (PaLM's convention, and what most published MFU figures use); `causal_halving=True`
  counts only the unmasked half and halves the attention term and nothing else.

With N = the matmul weights (all blocks plus the head, embedding excluded), this is
PaLM's (Chowdhery et al. 2022, appendix B) 6·N + 12·L·H·Q·T. For a standard model (G = H,
an MLP of 8·d² parameters, whether two 4d matrices or SwiGLU's three 8d/3 ones) N per layer
is 12·d². Norm gains are parameters but not matmul weights, so they are not in N.

MFU = (tokens/s per device × model FLOPs per token) ÷ peak FLOP/s per device. Hardware
FLOPs (HFU) add what activation checkpointing recomputes; MFU never does, so MFU compares
runs fairly whatever they recompute. Unknown peak → MFU is None, never a guess.
"""

from __future__ import annotations

import math

from suanli.infra.model import ModelConfig

RECOMPUTE = ("none", "full", "selective")


def _check_seq_len(seq_len: int) -> None:
    if int(seq_len) <= 0:
        raise ValueError(f"train.seq_len: must be a positive integer, got {seq_len}")


def _forward_parts(cfg: ModelConfig, seq_len: int, causal_halving: bool) -> tuple[float, float, float]:
    """Forward FLOPs per token: (block matmuls over all layers, attention scores+values
    over all layers, output head)."""
    _check_seq_len(seq_len)
    d, q, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    qo = 2 * (2 * d * cfg.n_heads * q)       # q and o projections
    kv = 2 * (2 * d * cfg.n_kv_heads * q)    # k and v projections (GQA)
    mlp = 3 * (2 * d * f)                    # SwiGLU gate, up, down
    attn = 2 * (2 * cfg.n_heads * q * seq_len)
    if causal_halving:
        attn /= 2
    return float(cfg.n_layers * (qo + kv + mlp)), float(cfg.n_layers * attn), float(2 * d * cfg.vocab_size)


def model_flops_per_token(cfg: ModelConfig, seq_len: int, causal_halving: bool = False) -> float:
    """Training (forward + backward) model FLOPs per token: 3 × the forward matmuls."""
    blocks, attn, head = _forward_parts(cfg, seq_len, causal_halving)
    return 3 * (blocks + attn + head)


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int, recompute: str = "none",
                             causal_halving: bool = False) -> float:
    """Model FLOPs plus the forward work activation checkpointing does again:

    - "none": equal to model FLOPs.
    - "full": each transformer block's forward runs twice (4× forward for the blocks). The
      output head sits outside the checkpointed blocks and is not recomputed (as in
      Korthikanti et al. 2022's 96·B·s·L·h² formula).
    - "selective": only the attention scores/values (q·kᵀ, softmax, p·v) are recomputed —
      one more forward of the attention term.

    Recomputation inside fused attention kernels (flash attention's backward) is a kernel
    detail and not counted, by any option.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"parallel.activation_checkpoint: {recompute!r} is not one of {RECOMPUTE}")
    blocks, attn, head = _forward_parts(cfg, seq_len, causal_halving)
    extra = {"none": 0.0, "full": blocks + attn, "selective": attn}[recompute]
    return 3 * (blocks + attn + head) + extra


def _nonnegative(name: str, x: float) -> float:
    x = float(x)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")
    return x


def achieved_flops_per_device(tokens_per_s_global: float, num_devices: int, flops_per_token: float) -> float:
    """Achieved FLOP/s per device. `tokens_per_s_global` is the whole job's throughput
    (global batch tokens ÷ step time); `num_devices` is every device that produced it (the
    world size — tensor- and pipeline-parallel ranks share tokens, so dp size is not enough)."""
    if int(num_devices) <= 0:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices}")
    return _nonnegative("tokens_per_s_global", tokens_per_s_global) / int(num_devices) \
        * _nonnegative("flops_per_token", flops_per_token)


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]; None when the peak is unknown (None or <= 0)."""
    tokens = _nonnegative("tokens_per_s_per_device", tokens_per_s_per_device)
    flops = _nonnegative("flops_per_token", flops_per_token)
    if peak_flops is None or not peak_flops > 0:
        return None
    return tokens * flops / float(peak_flops)


__all__ = ["model_flops_per_token", "hardware_flops_per_token", "mfu", "achieved_flops_per_device", "RECOMPUTE"]
