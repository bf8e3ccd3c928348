"""Gradient codecs: how a float32 buffer is put on the wire.

Two families:

- Cast codecs (fp32, bf16, fp16) change only the element type. Values stay summable, so
  they ride a plain all-reduce (sums happen in the wire type, as torch's
  `bf16_compress_hook` does; dividing by the group size first keeps fp16 from overflowing).
- Block-quantized codecs (int8, fp8 e4m3, int4) store one fp32 scale per block of `block`
  elements (scale = block absmax / code max) and one byte per element (int4: half a byte,
  two codes packed per byte; Streaming DiLoCo, arXiv:2501.18512, sends its pseudo-gradients
  in 4 bits without loss, so int4 is offered for comm.diloco_compress). Codes from different
  ranks have different scales and cannot be summed on the wire, so the all-reduce built on
  them is a quantized reduce-scatter + all-gather that dequantizes and sums in fp32
  (allreduce.py): no sum ever happens in 8 bits, so nothing can overflow.

Round-to-nearest int8 has a per-element error of at most half a step, scale/2 =
absmax/254 of the block. Error feedback (Seide et al. 2014, "1-bit SGD"; Karimireddy et al.
2019, "Error Feedback Fixes SignSGD") adds what compression dropped last step to this
step's input, so the error does not accumulate over steps: the sum of everything sent
differs from the sum of the true inputs by one step's residual only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAST_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = getattr(torch, "float8_e4m3fn", None)


@dataclass(frozen=True)
class BlockQuant:
    """Per-block absmax scaling to one byte per element (int8, or fp8 e4m3 where torch has it)."""

    kind: str = "int8"      # int8 | fp8 | int4
    block: int = 256

    @property
    def code_max(self) -> float:
        # int8/int4 keep the most negative code unused so the range is symmetric; 448 is
        # e4m3's largest finite value.
        return {"int8": 127.0, "int4": 7.0}.get(self.kind, 448.0)

    def code_numel(self, numel: int) -> int:
        """uint8 code bytes for `numel` elements."""
        return numel // 2 if self.kind == "int4" else numel

    def wire_bytes(self, numel: int) -> int:
        """Bytes one full buffer of `numel` elements takes (codes + fp32 scales)."""
        return self.code_numel(numel) + 4 * (numel // self.block)

    def padded(self, numel: int, multiple: int = 1) -> int:
        """`numel` rounded up so it splits into `multiple` block-aligned chunks."""
        unit = self.block * multiple
        return -(-numel // unit) * unit

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: 1-D float32, numel a multiple of `block` → (uint8 codes, float32 scales)."""
        blocks = x.view(-1, self.block)
        scales = blocks.abs().amax(dim=1) / self.code_max
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
        scaled = blocks / safe
        if self.kind == "int8":
            codes = scaled.round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        elif self.kind == "int4":
            nibbles = (scaled.round_().clamp_(-7, 7) + 8).to(torch.uint8).reshape(-1, 2)
            return nibbles[:, 0] | (nibbles[:, 1] << 4), scales
        else:
            if FP8 is None:
                raise RuntimeError("comm: fp8 needs torch.float8_e4m3fn (torch >= 2.1); use int8 instead")
            codes = scaled.to(FP8).view(torch.uint8)
        return codes.reshape(-1), scales

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4":
            pairs = torch.stack([codes & 0xF, codes >> 4], dim=1)
            values = pairs.reshape(-1, self.block).float() - 8.0
            return (values * scales.unsqueeze(1)).reshape(-1)
        blocks = codes.view(-1, self.block)
        values = blocks.view(torch.int8).float() if self.kind == "int8" else blocks.view(FP8).float()
        return (values * scales.unsqueeze(1)).reshape(-1)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(*self.quantize(x))

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Largest |x - roundtrip(x)| per block: half a step for int8/int4, half an ulp at the top
        binade for e4m3 (3 mantissa bits: 2^-4 of the block absmax)."""
        amax = x.view(-1, self.block).abs().amax(dim=1)
        return amax / (2 * self.code_max) if self.kind in ("int8", "int4") else amax / 16.0


def make_codec(name: str, block: int = 256) -> torch.dtype | BlockQuant:
    """A cast dtype for fp32/bf16/fp16, a BlockQuant for int8/fp8."""
    if name in CAST_DTYPES:
        return CAST_DTYPES[name]
    if name in ("int8", "fp8", "int4"):
        return BlockQuant(name, block)
    raise ValueError(f"comm: unknown codec '{name}'; choose one of {sorted(CAST_DTYPES) + ['fp8', 'int4', 'int8']}")


class Residuals:
    """Error-feedback memory: per key, what compression dropped last time."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._store: dict[object, torch.Tensor] = {}

    def compensate(self, key: object, x: torch.Tensor) -> torch.Tensor:
        """x plus last step's residual for `key` (x itself when disabled or new)."""
        r = self._store.get(key)
        if not self.enabled or r is None or r.shape != x.shape:
            return x
        return x + r

    def update(self, key: object, sent_for: torch.Tensor, delivered: torch.Tensor) -> None:
        if self.enabled:
            self._store[key] = sent_for - delivered

    def state_dict(self) -> list:
        # Pairs, not a dict: keys are tuples, and a list of pairs round-trips through
        # torch.load(weights_only=True) whatever the key's shape.
        return [[key, r.detach().clone()] for key, r in self._store.items()]

    def load_state_dict(self, pairs: list) -> None:
        self._store = {_tupled(key): r for key, r in pairs}

    def norm(self) -> float:
        return float(sum(r.float().norm() ** 2 for r in self._store.values()) ** 0.5) if self._store else 0.0


def _tupled(key):
    """Keys come back from a checkpoint as they were saved; lists (from other serialisers)
    become tuples again so they match the live keys."""
    return tuple(_tupled(k) for k in key) if isinstance(key, (list, tuple)) else key
