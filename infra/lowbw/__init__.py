"""suanli.infra.lowbw: low-bandwidth communication built from plain torch collectives, so it
works on every backend and between vendors whose collective libraries cannot talk.

- codecs.py: bf16/fp16 casts, blockwise int8/fp8 quantization, error-feedback residuals
- allreduce.py: quantized reduce-scatter + all-gather all-reduce; hierarchical all-reduce
- powersgd.py: PowerSGD (Vogels et al. 2019) where DDP's hook does not apply
- diloco.py: DiLoCo / Streaming DiLoCo outer steps (Douillard et al. 2023, 2025)
- fsdp.py: compressed reduce-scatter for FSDP2
- pipeline_compress.py: bf16/int8 activations and gradients at pipeline stage boundaries
- options.py: CommOptions, the trainer's seam, and attach_comm_options(trainer)
- harness.py: a minimal loop using that seam (tests, `suanli bench lowbw`)
"""

from suanli.infra.lowbw.options import CommOptions, attach_comm_options

__all__ = ["CommOptions", "attach_comm_options"]
