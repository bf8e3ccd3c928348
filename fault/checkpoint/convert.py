"""Export a checkpoint's model as one safetensors file (full, unsharded tensors keyed by the
model's parameter names) for inference or other frameworks. Runs in one process whatever
layout wrote the checkpoint: DCP assembles each tensor from its shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .manifest import DCP_METADATA, TRAIN_STATE, CheckpointError
from .safe_load import SafeFileSystemReader, SafeLoadPlanner, load_metadata

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors (names without DCP's `model.` prefix), on CPU."""
    md = load_metadata(step_dir / DCP_METADATA)
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not flat:
        raise CheckpointError(f"{step_dir}: holds no model tensors")
    dcp.load(flat, storage_reader=SafeFileSystemReader(step_dir), planner=SafeLoadPlanner(allow_partial_load=True),
             no_dist=True)
    return {k[len("model."):]: v for k, v in flat.items()}


def export_safetensors(step_dir: Path, out: Path, dtype: str | None = None) -> dict:
    """Write `out`; returns a summary (tensors, parameters, bytes)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise RuntimeError("suanli ckpt convert needs the safetensors package: pip install safetensors") from None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    tensors = load_model_tensors(step_dir)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    train_state = json.loads((step_dir / TRAIN_STATE).read_text())
    meta = {"format": "pt", "suanli_step": str(train_state.get("step")),
            "suanli_model": json.dumps(train_state.get("meta", {}).get("model", {}))}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=meta)
    return {"step": train_state.get("step"), "tensors": len(tensors),
            "parameters": sum(v.numel() for v in tensors.values()), "bytes": out.stat().st_size, "path": str(out)}


__all__ = ["load_model_tensors", "export_safetensors"]
