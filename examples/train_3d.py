"""Train with the Python API: suanli.init → Transformer → parallelize → a plain loop.

Run with 4 local processes (pipeline 2 × tensor 2):
    suanli train examples/tiny.toml --nproc 4 --set parallel.tp=2 --set parallel.pp=2
or by hand with torchrun-style env, e.g.:
    torchrun --nproc-per-node 4 examples/train_3d.py
"""

import torch

import suanli
from suanli.infra.data import DistributedBatchSampler, TokenDataset, make_batch, synthetic_tokens
from suanli.infra.model import preset
from suanli.infra.optim import build_optimizer

ctx = suanli.init(suanli.ParallelConfig(tp=2, pp=2))
cfg = preset("tiny")
torch.manual_seed(0)  # the same full model on every rank; parallelize keeps each rank's shard
model = suanli.parallelize(suanli.Transformer(cfg), ctx, seq_len=64, n_microbatches=2)
opt = build_optimizer(ctx.accelerator, model.parameters(), lr=1e-3, weight_decay=0.1)

data = TokenDataset(synthetic_tokens(200_000, cfg.vocab_size, seed=0), seq_len=64)
sampler = DistributedBatchSampler(len(data), global_batch=8, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
for step, indices in zip(range(20), sampler):
    inputs, targets = make_batch(data, indices)
    with torch.distributed.tensor.parallel.loss_parallel():
        losses = model.pipeline.step(inputs, targets)
    model.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad()
    if losses:  # only the rank holding the last stage sees the loss
        loss = torch.stack([l.full_tensor() if hasattr(l, "full_tensor") else l for l in losses]).mean()
        if ctx.tp_rank == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}")
suanli.shutdown()
