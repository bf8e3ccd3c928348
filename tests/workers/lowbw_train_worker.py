"""Rank body for test_lowbw_train: train the tiny model once per run spec with the
low-bandwidth seam (suanli.infra.lowbw.harness) and print one RESULT line per run.

argv[1]: JSON list of {"name": str, "set": [section.key=value, ...], "optimizer": "adamw"|"sgd"}.
A run whose setup raises ValueError reports {"name", "error"} instead.
All runs share one process group; each builds its own mesh for its layout.
"""

import json
import sys

import torch

import suanli
from suanli.infra.config import load_config
from suanli.infra.lowbw.harness import build, train

BASE = ["train.seq_len=64", "train.global_batch=8", "train.micro_batch=2", "train.warmup_steps=2",
        "data.synthetic_tokens=60000", 'model.preset="tiny"', "train.lr=1e-3"]

for spec in json.loads(sys.argv[1]):
    cfg = load_config(None, BASE + spec.get("set", []))
    try:
        run = build(cfg, optimizer=spec.get("optimizer", "adamw"))
    except ValueError as e:  # a spec may check that a bad combination is refused
        if torch.distributed.get_rank() == 0:
            print("RESULT " + json.dumps({"name": spec["name"], "error": str(e)}), flush=True)
        continue
    records = train(run)
    checksum = sum(float(p.detach().double().pow(2).sum()) for p in run.params)
    if run.ctx.rank == 0:
        print("RESULT " + json.dumps({"name": spec["name"], "losses": [r["loss"] for r in records],
                                      "comm_bytes": [r["comm_bytes"] for r in records],
                                      "step_times": [r["step_time_s"] for r in records],
                                      "param_sq": checksum, "path": run.comm.describe()["path"]}), flush=True)
    run.comm.close()
torch.distributed.barrier()  # nobody tears down while a peer still talks
suanli.shutdown()
