"""suanli.bench: measurement — FLOPs per token, MFU, peak probes, communication and recovery benchmarks."""

from .flops import achieved_flops_per_device, hardware_flops_per_token, mfu, model_flops_per_token

__all__ = ["model_flops_per_token", "hardware_flops_per_token", "mfu", "achieved_flops_per_device"]
