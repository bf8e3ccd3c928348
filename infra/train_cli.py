"""`suanli train` and `suanli data`: the command-line face of the trainer and data tools."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config")
    p.add_argument("config", nargs="?", default=None, help="TOML config (defaults apply to what it leaves out)")
    p.add_argument("--nproc", type=int, default=1, help="local processes to start (torchrun-compatible env)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; repeatable")
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local: N processes on this machine; ray: one Ray actor per accelerator, supervised")
    p.add_argument("--workers", type=int, default=None, help="ranks under --launcher ray")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--run-dir", default=None, help="shortcut for --set train.run_dir=...")
    p.add_argument("--health", default=None, metavar="ADDR|auto|off",
                   help="under --launcher ray: a running health daemon to report to (default auto: start one); "
                        "shortcut for --set fault.health=...")
    p.add_argument("--inject-fault", dest="faults", action="append", default=[], metavar="SPEC",
                   help="kill:rank=1:step=30 | hang:rank=0:step=50 | nan:step=40 | slow:rank=1:factor=3 | "
                        "raise:rank=0:step=20; repeatable")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from suanli.infra.config import load_config

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f'train.run_dir="{args.run_dir}"')
    if args.health:
        overrides.append(f'fault.health="{args.health}"')
    cfg = load_config(args.config, overrides)
    if args.launcher == "ray":
        return run_supervised(cfg, args)
    world_size = int(os.environ.get("WORLD_SIZE", args.nproc))
    preflight(cfg, world_size)  # every layout error before any process starts
    from suanli.infra.faults import parse_fault

    faults = [parse_fault(f) for f in args.faults]
    if faults:
        os.environ["SUANLI_INJECT_FAULTS"] = ",".join(str(f) for f in faults)
    if args.nproc > 1 and "RANK" not in os.environ:
        from suanli.infra.launch import launch_local

        cmd = [sys.executable, "-m", "suanli.cli", "train"] + ([args.config] if args.config else [])
        for o in overrides:
            cmd += ["--set", o]
        res = launch_local(cmd, args.nproc)
        if res.returncode != 0:
            print(f"suanli train: {res.describe()}; the other ranks were stopped", file=sys.stderr)
        return res.returncode if res.returncode >= 0 else 128 - res.returncode  # the shell's convention

    from suanli.infra.distributed import shutdown
    from suanli.infra.faults import FaultInjector, faults_from_env
    from suanli.infra.trainer import Trainer

    trainer = Trainer(cfg)
    FaultInjector(faults_from_env(), trainer.run_dir, trainer.ctx.rank).attach(trainer)
    try:
        results = trainer.fit()
        if trainer.is_logger and results:
            print(f"done: {trainer.step} steps, final loss {results[-1].loss:.4f}, run directory {trainer.run_dir}")
    finally:
        shutdown()
    return 0


def run_supervised(cfg, args) -> int:
    from suanli.infra.cluster.supervisor import JobFailed, Supervisor
    from suanli.infra.faults import parse_fault

    workers = args.workers or args.nproc
    preflight(cfg, workers)
    faults = [str(parse_fault(f)) for f in args.faults]
    try:
        summary = Supervisor(cfg, workers=workers, ray_address=args.ray_address, faults=faults).run()
    except JobFailed as e:
        print(f"suanli train: job failed: {e}", file=sys.stderr)
        return 1
    print_summary(summary, cfg.train.run_dir)
    return 0


def print_summary(summary: dict, run_dir: str) -> None:
    """The end-of-job report a person reads: loss endpoints, speed, MFU, every recovery."""
    mfu = summary.get("mfu")
    print(f"\n== {run_dir}: {summary.get('steps')} steps on {summary.get('world_size')} workers, "
          f"{summary.get('wall_s')} s wall ==")
    print(f"loss {summary.get('first_loss', float('nan')):.4f} -> {summary.get('final_loss', float('nan')):.4f} | "
          f"{summary.get('tokens_per_s', 0):,.0f} tokens/s | MFU "
          + (f"{100 * mfu:.2f}% (peak: {summary.get('peak_source')})" if mfu is not None else "unknown (no peak)"))
    for i, r in enumerate(summary.get("recoveries", []), 1):
        where = f"on rank {r['rank']}" if r["rank"] is not None else f"to {r['world_size_after']} workers"
        print(f"recovery {i}: {r['failure']} {where} | detected in {r['detection_s']} s | "
              f"first step after restart {r['restart_s']} s later | resumed from step {r['resumed_from_step']}, "
              f"{r['steps_lost']} step(s) recomputed")
    print(f"details: {run_dir}/summary.json, events.jsonl, metrics.jsonl" +
          (", logs/rank*.log" if summary.get("launcher") == "ray" else ""))


def preflight(cfg, world_size: int) -> None:
    """Check the layout against the world size and the model's shapes."""
    from suanli.infra.config import model_config
    from suanli.infra.distributed import ParallelConfig
    from suanli.infra.pipeline import split_layers, stages_per_rank
    from suanli.infra.tensor_parallel import check_tp_degree

    p = cfg.parallel
    par = ParallelConfig(p.tp, p.pp, p.dp_replicate, p.dp_shard).resolve(world_size)
    mcfg = model_config(cfg)
    check_tp_degree(mcfg, par.tp)
    if par.pp > 1:
        split_layers(mcfg.n_layers, par.pp * stages_per_rank(p.pp_schedule, p.pp_stages_per_rank),
                     p.pp_layers if p.pp_layers == "auto" else list(p.pp_layers), costs=(0.0, 1.0, 1.0))


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="make token files for training")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write a synthetic corpus with learnable structure")
    s.add_argument("out", help="output .bin path (a .json metadata file is written beside it)")
    s.add_argument("--tokens", type=int, default=10_000_000)
    s.add_argument("--vocab-size", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run_synth)
    t = dsub.add_parser("tokenize", help="tokenize plain-text files with a tokenizer you name")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", required=True, help="output .bin path")
    t.add_argument("--tokenizer", required=True,
                   help="a tiktoken encoding name (e.g. cl100k_base) or a local Hugging Face tokenizer directory")
    t.set_defaults(func=run_tokenize)


def run_synth(args) -> int:
    import json

    from suanli.infra.data import write_synthetic_corpus

    path = write_synthetic_corpus(args.out, args.tokens, args.vocab_size, args.seed)
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    print(f"wrote {meta['num_tokens']:,} tokens to {path} (entropy {meta['entropy_nats_per_token']:.3f} nats/token, "
          f"uniform would be {meta['uniform_nats_per_token']:.3f})")
    return 0


def run_tokenize(args) -> int:
    from suanli.infra.data import tokenize_text_files

    path = tokenize_text_files(args.files, args.out, args.tokenizer)
    print(f"wrote {path}")
    return 0
