"""suanli.fault: detection and recovery — the heartbeat health daemon (health/), checkpoints
(checkpoint/), the loss-spike guard (guard.py) and the trainer's recovery glue (recovery.py).

Names load on first use, so a process that only checkpoints never imports gRPC."""

from importlib import import_module

_EXPORTS = {
    "Checkpointer": "suanli.fault.checkpoint",
    "HeartbeatReporter": "suanli.fault.health",
    "HealthClient": "suanli.fault.health",
    "DetectorConfig": "suanli.fault.health",
    "start_daemon": "suanli.fault.health",
    "SpikeGuard": "suanli.fault.guard",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'suanli.fault' has no attribute {name!r}")
