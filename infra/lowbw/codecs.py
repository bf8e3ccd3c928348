"""Gradient codecs: how a float32 buffer is put on the wire.

Two families:

- Cast codecs (fp32, bf16, fp16) change only the element type. Values stay summable, so
  they ride a plain all-reduce (sums happen in the wire type, as torch's
  `bf16_compress_hook` does; dividing by the group size first keeps fp16 from overflowing).
- Block-quantized codecs (int8, fp8 e4m3) store one fp32 scale per block of `block`
  elements (scale = block absmax / code max) and one byte per element. Codes from different
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

    kind: str = "int8"      # int8 | fp8
    block: int = 256

    @property
    def code_max(self) -> float:
        # int8 keeps -128 unused so the code range is symmetric; 448 is e4m3's largest finite value.
        return 127.0 if self.kind == "int8" else 448.0

    def wire_bytes(self, numel: int) -> int:
        """Bytes one full buffer of `numel` elements takes (codes + fp32 scales)."""
        return numel + 4 * (numel // self.block)

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
        else:
            if FP8 is None:
                raise RuntimeError("comm: fp8 needs torch.float8_e4m3fn (torch >= 2.1); use int8 instead")
            codes = scaled.to(FP8).view(torch.uint8)
        return codes.reshape(-1), scales

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        blocks = codes.view(-1, self.block)
        values = blocks.view(torch.int8).float() if self.kind == "int8" else blocks.view(FP8).float()
        return (values * scales.unsqueeze(1)).reshape(-1)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(*self.quantize(x))

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Largest |x - roundtrip(x)| per block: half a step for int8, half an ulp at the top
        binade for e4m3 (3 mantissa bits: 2^-4 of the block absmax)."""
        amax = x.view(-1, self.block).abs().amax(dim=1)
        return amax / 254.0 if self.kind == "int8" else amax / 16.0


def make_codec(name: str, block: int = 256) -> torch.dtype | BlockQuant:
    """A cast dtype for fp32/bf16/fp16, a BlockQuant for int8/fp8."""
    if name in CAST_DTYPES:
        return CAST_DTYPES[name]
    if name in ("int8", "fp8"):
        return BlockQuant(name, block)
    raise ValueError(f"comm: unknown codec '{name}'; choose one of {sorted(CAST_DTYPES) + ['fp8', 'int8']}")


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

    def norm(self) -> float:
        return float(sum(r.float().norm() ** 2 for r in self._store.values()) ** 0.5) if self._store else 0.0
