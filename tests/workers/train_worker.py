"""Rank body for the parity tests: train the tiny model with `--set` overrides, print losses."""

import json
import sys

from suanli.infra.config import load_config
from suanli.infra.trainer import Trainer

BASE = ["train.steps=10", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
        "train.warmup_steps=2", "data.synthetic_tokens=60000", "model.preset=\"tiny\"", "train.lr=1e-3"]

cfg = load_config(None, BASE + sys.argv[2:])
cfg.train.run_dir = sys.argv[1]
trainer = Trainer(cfg)
results = trainer.fit()
if trainer.ctx.rank == 0:
    print("RESULT " + json.dumps({"losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results],
                                  "stage_layers": trainer.pmodel.stage_layers,
                                  "dp": trainer.pmodel.data_parallel}), flush=True)
import suanli  # noqa: E402

suanli.shutdown()
