"""Rank body: the real Trainer on a heterogeneous layout ([hetero] groups in the config make
the Trainer build its layout with build_hetero). Prints the same RESULT line as
train_worker.py. argv[1]: run dir; the rest: --set overrides.
"""

import json
import sys

from suanli.infra.config import load_config
from suanli.infra.trainer import Trainer

BASE = ["train.steps=10", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
        "train.warmup_steps=2", "data.synthetic_tokens=60000", "model.preset=\"tiny\"", "train.lr=1e-3",
        "hetero.emulated=true"]

cfg = load_config(None, BASE + sys.argv[2:])
cfg.train.run_dir = sys.argv[1]
trainer = Trainer(cfg)
results = trainer.fit()
ctx = trainer.ctx
stats = trainer.pmodel.pipeline.last_stats.as_dict()
if ctx.rank == 0:
    print("RESULT " + json.dumps({"losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results],
                                  "stage_layers": trainer.pmodel.stage_layers, "dp": trainer.pmodel.data_parallel,
                                  "dp_bridge": stats["dp_bridge"], "bridge": stats["bridge"]}), flush=True)

import torch.distributed as dist  # noqa: E402

dist.barrier()
dist.destroy_process_group()
