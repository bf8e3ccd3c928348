"""Rank body for the checkpoint/guard tests: train a very small model with `--set`
overrides in RUN_DIR (argv[1]) and print the per-step results.

NAN_AT=s: make the gradients NaN during step s (once per run directory), as a blow-up would.
"""

import json
import os
import sys

from suanli.infra.config import load_config
from suanli.infra.trainer import Trainer

BASE = ["train.steps=8", "train.seq_len=32", "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=2",
        "train.lr=1e-3", "data.synthetic_tokens=20000", 'model.preset="tiny"', "model.dim=64", "model.n_layers=4",
        "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128", "model.vocab_size=256",
        "checkpoint.every_steps=2", "checkpoint.keep_last=10"]

cfg = load_config(None, BASE + sys.argv[2:])
cfg.train.run_dir = sys.argv[1]
trainer = Trainer(cfg)

nan_at = int(os.environ.get("NAN_AT", "0"))


def poison(tr, phase):
    marker = tr.run_dir / "nan_injected"
    if phase == "optimizer" and tr.step + 1 == nan_at and not marker.exists():
        for p in tr.params:
            if p.grad is not None:
                p.grad.fill_(float("nan"))
                break
        if tr.is_logger:
            marker.write_text("1")


if nan_at:
    trainer.hooks.on_phase.append(poison)
results = trainer.fit()
if trainer.ctx.rank == 0:
    print("RESULT " + json.dumps({"steps": [r.step for r in results], "losses": [r.loss for r in results],
                                  "final_step": trainer.step}), flush=True)
import suanli  # noqa: E402

suanli.shutdown()
