"""Checkpoints that survive anything: async sharded DCP saves, atomic commits with a SHA-256
manifest, verified resume that reshards to any layout, and nothing unpickled unsafely.

`Checkpointer` is the entry point; `TrainState` says what to save; `manifest` holds the
on-disk contract; `safe_load` the restricted reading; `convert` the safetensors export.
"""

from .checkpointer import Checkpointer, verify_checkpoint
from .manifest import CheckpointError, CheckpointInfo, step_dir_name
from .state import TrainState

__all__ = ["Checkpointer", "TrainState", "CheckpointError", "CheckpointInfo", "verify_checkpoint", "step_dir_name"]
