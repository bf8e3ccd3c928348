"""Tensor parallel (Megatron-style) with sequence parallel and loss parallel, as DTensor plans.

Attention and MLP: column-parallel in-projections, row-parallel out-projections. Between
blocks the residual stream stays sharded along the sequence (sequence parallel), so norms
run on 1/tp of the tokens and activations cost 1/tp of the memory. The embedding is
vocab-parallel and the output head leaves logits sharded along the vocabulary, so the
cross-entropy runs under `loss_parallel()` without ever gathering the full logits.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from suanli.infra.model import ModelConfig


def check_tp_degree(cfg: ModelConfig, tp: int) -> None:
    """Errors that name the field and what would fit, before any sharding starts."""
    if tp == 1:
        return
    fits = [d for d in range(1, cfg.n_heads + 1) if cfg.n_heads % d == 0 and cfg.n_kv_heads % d == 0]
    if cfg.n_heads % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide model.n_heads={cfg.n_heads}; tp can be one of {fits}")
    if cfg.n_kv_heads % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide model.n_kv_heads={cfg.n_kv_heads} (grouped-query "
                         f"attention shards whole kv heads); tp can be one of {fits}")
    if cfg.ffn_dim % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide model.ffn_dim={cfg.ffn_dim}")
    if cfg.vocab_size % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide model.vocab_size={cfg.vocab_size} (the embedding "
                         f"and head are vocab-parallel); pad the vocabulary to a multiple of {tp}")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a full Transformer or one pipeline stage of it) over `tp_mesh` in place."""
    top: dict[str, object] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        top["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # rope cos/sin (the other inputs) are plain tensors: leave them alone
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
