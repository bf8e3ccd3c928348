"""Rank body for the heterogeneous tests: build_hetero + a training loop written like
Trainer.train_step (same data, optimizer, schedule, clipping and loss reduction), so its
losses compare with the homogeneous Trainer's.

argv[1]: a JSON object —
  sets:        --set overrides on top of the parity tests' base config
  steps:       optimizer steps to run (default 10)
  save_dir / save_at:  save a checkpoint at that step into save_dir
  load_dir / load_step / load_steps:  afterwards, load that checkpoint and run load_steps more
  check_groups: assert no vendor-backend group spans device groups
  timing:      {"layouts": [layers, ...], "steps": n}: alternate steps between builds, report times
  codecs:      ["bf16", "int8"]: afterwards, rebuild with each bridge codec and run `steps`
Prints `RESULT {json}` on rank 0 (and `RANK {json}` per rank where useful).
"""

import contextlib
import json
import statistics
import sys

import torch
import torch.distributed as dist

BASE = ["train.steps=10", "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2",
        "train.warmup_steps=2", "data.synthetic_tokens=60000", "model.preset=\"tiny\"", "train.lr=1e-3",
        "hetero.emulated=true"]

spec = json.loads(sys.argv[1])
if spec.get("dump_after_s"):  # debugging a hang: every rank prints its stack, then exits
    import faulthandler

    faulthandler.dump_traceback_later(spec["dump_after_s"], exit=False)

from suanli.infra.config import load_config, model_config  # noqa: E402
from suanli.infra.data import DistributedBatchSampler, TokenDataset, make_batch, synthetic_tokens  # noqa: E402
from suanli.infra.optim import build_lr_scheduler, build_optimizer, clip_grad_norm_  # noqa: E402

log: list = []
if spec.get("check_groups"):
    # Record every group anyone creates while the job is built.
    _real_new_group = dist.new_group

    def _logged(*a, **kw):
        ranks = kw.get("ranks", a[0] if a else None)
        log.append((tuple(ranks) if ranks is not None else None, kw.get("backend")))
        return _real_new_group(*a, **kw)

    dist.new_group = _logged

from suanli.infra.hetero import build_hetero  # noqa: E402


class Run:
    """One built layout with its optimizer and data, stepping like the Trainer."""

    def __init__(self, cfg):
        self.cfg = cfg
        t = cfg.train
        self.ctx, self.pm = build_hetero(cfg)
        self.params = list(self.pm.parameters())
        self.opt = build_optimizer(self.ctx.accelerator, self.params, t.lr, t.weight_decay)
        self.sched = build_lr_scheduler(self.opt, t.warmup_steps, t.steps, t.min_lr_ratio)
        mc = model_config(cfg)
        self.model_cfg = mc
        self.data = TokenDataset(synthetic_tokens(cfg.data.synthetic_tokens, mc.vocab_size, t.seed), t.seq_len,
                                 vocab_size=mc.vocab_size)
        self.sampler = DistributedBatchSampler(len(self.data), t.global_batch, self.ctx.dp_rank, self.ctx.dp_size,
                                               seed=t.seed)

    def step(self):
        from torch.distributed.tensor.parallel import loss_parallel

        inputs, targets = make_batch(self.data, next(self.sampler))
        tp_loss = loss_parallel if self.pm.tensor_parallel else contextlib.nullcontext
        with tp_loss():
            losses = self.pm.pipeline.step(inputs, targets)
        local = torch.zeros((), dtype=torch.float32)
        if self.pm.pipeline.has_last:
            local = torch.stack([l.float() for l in losses]).mean()
        pp = self.ctx.group("pp") if self.ctx.parallel.pp > 1 else None
        self.any_layout_norm = self.pm.grad_norm()   # the layout-free norm must agree
        grad_norm = clip_grad_norm_(self.params, self.cfg.train.grad_clip, pp)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        holds = self.pm.pipeline.has_last and self.ctx.tp_rank == 0
        t = (local if holds else torch.zeros(())).reshape(1).float()
        dist.all_reduce(t)
        return t.item() / self.ctx.dp_size, grad_norm

    def state(self):
        from suanli.fault.checkpoint import TrainState

        layout = {"world_size": self.ctx.world_size, "hetero": self.ctx.plan.describe()}
        return TrainState(self.pm.modules, self.opt, {"lr_scheduler": self.sched, "sampler": self.sampler},
                          meta={"layout": layout, "model": self.model_cfg.to_dict(), "config": self.cfg.to_dict()},
                          accelerator=self.ctx.accelerator)


def check_groups(run):
    from torch.distributed.tensor import DTensor

    plan, ctx = run.ctx.plan, run.ctx
    mine = set(ctx.role.group.ranks)
    assert dist.get_backend() == "gloo", dist.get_backend()
    for ranks, backend in log:
        assert ranks is not None, "a group over the whole world was created while building"
        if plan.crosses(ranks):
            # A member builds it on gloo; a non-member builds nothing (and passes no backend).
            want = "gloo" if ctx.rank in ranks else None
            assert backend == want, f"group {ranks} spans device groups; rank {ctx.rank} asked for {backend}"
    for rec in ctx.groups.records:
        if plan.crosses(rec.ranks):
            assert rec.purpose.startswith("bridge") and rec.backend == "gloo", rec
        else:
            assert not rec.purpose.startswith("bridge") or rec.purpose == "bridge-norm", rec
    for p in run.params:
        if isinstance(p, DTensor):
            assert set(p.device_mesh.mesh.flatten().tolist()) <= mine, "a tensor-parallel mesh leaves its group"
    return {"created": [[list(r), b] for r, b in log],
            "records": [[rec.purpose, list(rec.ranks), rec.backend] for rec in ctx.groups.records]}


def main():
    cfg = load_config(None, BASE + spec.get("sets", []))
    run = Run(cfg)
    SPEEDS.update({str(k): v for k, v in run.ctx.speeds.items()})
    out = {"stage_layers": run.pm.stage_layers, "speeds": run.ctx.speeds,
           "prediction": run.ctx.prediction.as_dict() if run.ctx.prediction else None}
    if spec.get("check_groups"):
        out["groups"] = check_groups(run)
    ckpt = None
    if spec.get("save_dir") or spec.get("load_dir"):
        from suanli.fault.checkpoint import Checkpointer

    losses, norms, stats, norms2 = [], [], [], []
    for step in range(1, spec.get("steps", 10) + 1):
        loss, norm = run.step()
        losses.append(loss)
        norms.append(norm)
        norms2.append(run.any_layout_norm)
        stats.append(run.pm.pipeline.last_stats.as_dict())
        if spec.get("save_dir") and step == spec["save_at"]:
            ckpt = Checkpointer(spec["save_dir"], every_steps=0, keep_last=0, async_save=False)
            ckpt.save(step, run.state())
    out.update(losses=losses, grad_norms=norms, any_layout_norms=norms2, bridge=stats[-1]["bridge"],
               dp_bridge=stats[-1]["dp_bridge"])

    if spec.get("load_dir"):
        loader = Checkpointer(spec["load_dir"], every_steps=0, keep_last=0, async_save=False)
        loaded = loader.load(spec["load_step"], run.state())
        out["resumed"] = [run.step() for _ in range(spec["load_steps"])]
        out["resume_notes"] = loaded["notes"]
        loader.close()
    if ckpt is not None:
        ckpt.close()

    if spec.get("timing"):
        out["timing"] = timing(cfg, spec["timing"])
    if spec.get("codecs"):
        out["codecs"] = {}
        for codec in spec["codecs"]:
            c = with_speeds(load_config(None, BASE + spec.get("sets", []) + [f'hetero.bridge_compress="{codec}"']))
            r = Run(c)
            got = [r.step()[0] for _ in range(spec.get("steps", 10))]
            out["codecs"][codec] = {"losses": got, "bridge": r.pm.pipeline.last_stats.bridge}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"rank": run.ctx.rank, "stage": run.ctx.role.stage,
                                      "stats": stats[-1], "device": run.ctx.accelerator.name})
    out["ranks"] = per_rank
    if run.ctx.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


SPEEDS: dict = {}


def with_speeds(cfg):
    """Later builds reuse the first build's speeds (a balance step measures once). The
    context reports a replica's speed; the config takes a device's (x tp)."""
    for i, g in enumerate(cfg.hetero.groups):
        if str(i) in SPEEDS:
            g["speed"] = SPEEDS[str(i)] / g.get("tp", 1)
    return cfg


def timing(cfg0, t):
    """Build one Run per layer split and alternate their steps, so machine load hits both
    alike; report each one's median step time, its measured and predicted bubble."""
    runs = []
    for layers in t["layouts"]:
        c = with_speeds(load_config(None, BASE + spec.get("sets", []) + [f"hetero.layers={json.dumps(layers)}"]))
        runs.append(Run(c))
    times = [[] for _ in runs]
    bubbles = [[] for _ in runs]
    busys = [[] for _ in runs]
    for i in range(t.get("warmup", 1) + t["steps"]):
        for j, r in enumerate(runs):
            dist.barrier()
            r.step()
            st = r.pm.pipeline.last_stats
            # The step time is the slowest rank's: every rank waits for it at the next barrier.
            box = torch.tensor([st.pipeline_s])
            dist.all_reduce(box, op=dist.ReduceOp.MAX)
            bub = torch.tensor([st.bubble])
            dist.all_reduce(bub)
            busy = [None] * dist.get_world_size()
            dist.all_gather_object(busy, round(st.busy_s, 4))
            if i >= t.get("warmup", 1):
                times[j].append(box.item())
                bubbles[j].append(bub.item() / dist.get_world_size())
                busys[j].append(busy)
    return [{"layers": r.pm.stage_layers, "median_s": statistics.median(ts), "times": ts,
             "bubble": statistics.median(bs), "busy": bu, "predicted": r.ctx.prediction.as_dict()}
            for r, ts, bs, bu in zip(runs, times, bubbles, busys)]


main()
dist.barrier()
dist.destroy_process_group()
