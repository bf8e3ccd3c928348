"""The job configuration: one dataclass tree holding every default.

A TOML file and `--set section.key=value` only override it. Unknown keys and wrong types
are errors that name the key; the effective config is written back as TOML to the run
directory so a run can always be reproduced from what it wrote.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelSection:
    preset: str = "tiny"
    # Explicit fields override the preset's; None keeps the preset's value.
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    vocab_size: int | None = None
    max_seq_len: int | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None


@dataclass
class DataSection:
    synthetic: bool = True
    path: str = ""                    # flat token file (.bin + .json) when synthetic = false
    synthetic_tokens: int = 2_000_000


@dataclass
class TrainSection:
    steps: int = 100
    seq_len: int = 256
    global_batch: int = 16            # sequences per optimizer step, across all data-parallel ranks
    micro_batch: int = 4
    lr: float = 3e-4
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0            # 0 disables clipping (the norm is still logged)
    dtype: str = "fp32"               # fp32 | bf16
    seed: int = 0
    run_dir: str = "runs/demo"
    peak_tflops: float = 0.0          # MFU denominator: 0 the HAL table, > 0 your figure, -1 measure (GEMM)
    log_every: int = 1


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    pp_schedule: str = "1f1b"         # gpipe | 1f1b | interleaved-1f1b | zbv
    pp_layers: Any = field(default_factory=list)  # [] uniform, [2, 3, 3, 2] explicit, or "auto"
    pp_stages_per_rank: int = 2       # for interleaved-1f1b (zbv always uses 2)
    activation_checkpoint: str = "none"  # none | full | selective


@dataclass
class CommSection:
    # Low-bandwidth options (suanli.infra.lowbw); every one is built from torch collectives.
    grad: str = "fp32"                # fp32 | bf16 | fp16 | int8 | fp8 | powersgd
    powersgd_rank: int = 4
    powersgd_warmup_steps: int = 10   # plain fp32 all-reduce for the first N steps
    quant_block: int = 256            # elements per int8/fp8 scale
    error_feedback: bool = True       # int8/fp8 and PowerSGD carry their compression error forward
    ddp_hooks: bool = True            # bf16/fp16/powersgd under DDP: torch's comm hooks; false: suanli's own
    diloco_inner_steps: int = 0       # 0 = off; H local steps between outer steps
    diloco_outer_lr: float = 0.7      # outer Nesterov SGD, DiLoCo paper defaults
    diloco_outer_momentum: float = 0.9
    diloco_compress: str = "fp32"     # pseudo-gradient codec: fp32 | bf16 | fp16 | int8 | fp8 | int4
    diloco_streaming_fragments: int = 1  # > 1: fragments synced in turn (Streaming DiLoCo)
    diloco_warmup_steps: int = 0      # data-parallel steps (diloco_compress codec) before the first inner phase
    diloco_overlap_steps: int = 0     # tau: apply a fragment's sync tau inner steps after launching it (0 = blocking)
    diloco_overlap_mix: float = 0.5   # alpha: local weights kept when an overlapped sync lands (Streaming DiLoCo)
    hierarchical: bool = False        # reduce-scatter in node, all-reduce across, all-gather in node
    node_size: int = 0                # ranks per node for `hierarchical`; 0 = group by hostname
    pp_compress: str = "none"         # pipeline activations/grads at stage boundaries: none | bf16 | int8
    pp_compress_boundaries: Any = field(default_factory=list)  # [] = all; [1] = between stages 1 and 2


@dataclass
class CheckpointSection:
    every_steps: int = 50             # save every N steps (and at the last); 0 disables
    keep_last: int = 3                # committed checkpoints kept; 0 keeps all
    keep_every: int = 0               # also keep every step divisible by this forever; 0: none
    async_: bool = True               # write in the background (the loop blocks only for the snapshot)
    resume: bool = True               # start from the newest valid checkpoint in the run directory
    dir: str = ""                     # "" = <run_dir>/checkpoints


@dataclass
class FaultSection:
    health: str = "auto"
    heartbeat_interval_s: float = 1.0
    dead_after_s: float = 3.0
    hang_after_s: float = 10.0        # no progress this long (at least; 3 x p99 step time) = hung
    spike_guard: bool = True          # NaN/Inf and loss-spike guard (fault/guard.py)
    spike_action: str = "rollback"    # rollback | stop | log
    spike_z: float = 6.0              # robust z-score (EMA + MAD) above which a loss is a spike
    spike_ema: float = 0.1            # weight of the newest loss in the loss trend
    spike_history: int = 50           # recent steps whose residuals give the median / MAD
    spike_min_history: int = 20       # steps before spikes are judged (NaN/Inf always are)
    rollback_steps: int = 0           # roll back to a checkpoint at least this many steps before the anomaly
    skip_batches: int = -1            # batches skipped after a rollback; -1: checkpoint..anomaly
    max_rollbacks: int = 3            # rollbacks allowed within rollback_window steps, then stop
    rollback_window: int = 1000


@dataclass
class HeteroSection:
    # One job across device types (suanli.infra.hetero). [[hetero.groups]] tables: device,
    # ranks (or nodes), tp, dp, stages, micro_batch, speed. [] = off (a homogeneous job).
    groups: Any = field(default_factory=list)
    layers: Any = field(default_factory=list)  # transformer layers per stage; [] = uniform or balanced
    balance: str = "none"             # none | table | measure: layers and rows per device speed
    bridge_compress: str = "none"     # none | bf16 | int8, for everything that crosses vendors
    emulated: bool = False            # register the test accelerator "cpu-emulated" (never auto-selected)


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    comm: CommSection = field(default_factory=CommSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    fault: FaultSection = field(default_factory=FaultSection)
    hetero: HeteroSection = field(default_factory=HeteroSection)

    def to_dict(self) -> dict:
        return {s.name: {_toml_key(k): v for k, v in asdict(getattr(self, s.name)).items() if v is not None}
                for s in fields(self)}


class ConfigError(ValueError):
    pass


def _toml_key(name: str) -> str:
    return name.rstrip("_")  # `async` is a Python keyword, stored as async_


def _field_map(section: Any) -> dict[str, Any]:
    return {_toml_key(f.name): f for f in fields(section)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are expected."""
    ann = str(annotation)  # a string: annotations are not evaluated under `from __future__`
    allow_none = "None" in ann
    if value is None and allow_none:
        return None
    if ann.startswith("Any"):
        return value
    base = ann.split("|")[0].strip()
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base == "str":
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {base}, got {type(value).__name__} {value!r}")


def apply_overrides(cfg: JobConfig, data: dict, origin: str) -> JobConfig:
    sections = {f.name: f for f in fields(cfg)}
    for sname, values in data.items():
        if sname not in sections:
            raise ConfigError(f"{origin}: unknown section [{sname}]; known sections: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{sname}] must be a table of keys")
        section = getattr(cfg, sname)
        fmap = _field_map(section)
        for k, v in values.items():
            if k not in fmap:
                raise ConfigError(f"{origin}: unknown key {sname}.{k}; known keys in [{sname}]: {sorted(fmap)}")
            setattr(section, fmap[k].name, _coerce(f"{sname}.{k}", v, fmap[k].type))
    return cfg


def parse_set(items: list[str]) -> dict:
    """`--set train.steps=20 parallel.pp_layers=[1,3]` → nested dict. Values parse as TOML
    literals; anything that is not one is taken as a string."""
    out: dict = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=20")
        key, raw = item.split("=", 1)
        sname, k = key.strip().split(".", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(sname, {})[k] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    cfg = JobConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        apply_overrides(cfg, data, str(p))
    if overrides:
        apply_overrides(cfg, parse_set(overrides), "--set")
    validate(cfg)
    return cfg


def loads_config(text: str, source: str = "<config text>") -> JobConfig:
    """A config from TOML text (e.g. `to_toml` output shipped to a remote rank)."""
    cfg = JobConfig()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    apply_overrides(cfg, data, source)
    validate(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    t, p = cfg.train, cfg.parallel

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for k in ("steps", "seq_len", "global_batch", "micro_batch"):
        need(getattr(t, k) > 0, f"train.{k}: must be > 0")
    need(t.dtype in ("fp32", "bf16"), f"train.dtype: '{t.dtype}' is not one of fp32, bf16")
    need(t.global_batch % t.micro_batch == 0,
         f"train.micro_batch: {t.micro_batch} does not divide train.global_batch={t.global_batch}")
    need(p.pp_schedule in ("gpipe", "1f1b", "interleaved-1f1b", "zbv"),
         f"parallel.pp_schedule: '{p.pp_schedule}' is not one of gpipe, 1f1b, interleaved-1f1b, zbv")
    need(p.activation_checkpoint in ("none", "full", "selective"),
         f"parallel.activation_checkpoint: '{p.activation_checkpoint}' is not one of none, full, selective")
    need(p.pp_layers == "auto" or (isinstance(p.pp_layers, list) and all(isinstance(x, int) for x in p.pp_layers)),
         f"parallel.pp_layers: expected a list of layer counts per stage or \"auto\", got {p.pp_layers!r}")
    _validate_comm(cfg.comm, need)
    _validate_hetero(cfg)
    need(cfg.data.synthetic or bool(cfg.data.path), "data.path: set a token file, or data.synthetic = true")
    for k in ("every_steps", "keep_last", "keep_every"):
        need(getattr(cfg.checkpoint, k) >= 0, f"checkpoint.{k}: must be >= 0")
    if cfg.fault.spike_guard:
        from suanli.fault.recovery import guard_config

        try:
            guard_config(cfg).validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _validate_comm(c: CommSection, need) -> None:
    codecs = ("fp32", "bf16", "fp16", "int8", "fp8")
    need(c.grad in codecs + ("powersgd",), f"comm.grad: '{c.grad}' is not one of {', '.join(codecs)}, powersgd")
    need(c.diloco_compress in codecs + ("int4",),
         f"comm.diloco_compress: '{c.diloco_compress}' is not one of {', '.join(codecs)}, int4")
    need(c.pp_compress in ("none", "bf16", "int8"), f"comm.pp_compress: '{c.pp_compress}' is not one of none, bf16, int8")
    need(c.powersgd_rank >= 1, f"comm.powersgd_rank: must be >= 1, got {c.powersgd_rank}")
    need(c.powersgd_warmup_steps >= 0, f"comm.powersgd_warmup_steps: must be >= 0, got {c.powersgd_warmup_steps}")
    need(c.quant_block >= 8 and c.quant_block % 8 == 0,
         f"comm.quant_block: must be a multiple of 8 and >= 8, got {c.quant_block}")
    need(c.diloco_inner_steps >= 0, f"comm.diloco_inner_steps: must be >= 0 (0 = off), got {c.diloco_inner_steps}")
    need(c.diloco_outer_lr > 0, f"comm.diloco_outer_lr: must be > 0, got {c.diloco_outer_lr}")
    need(0 <= c.diloco_outer_momentum < 1, f"comm.diloco_outer_momentum: must be in [0, 1), got {c.diloco_outer_momentum}")
    need(c.diloco_warmup_steps >= 0, f"comm.diloco_warmup_steps: must be >= 0, got {c.diloco_warmup_steps}")
    need(c.diloco_streaming_fragments >= 1,
         f"comm.diloco_streaming_fragments: must be >= 1, got {c.diloco_streaming_fragments}")
    need(c.diloco_overlap_steps >= 0, f"comm.diloco_overlap_steps: must be >= 0 (0 = blocking), got {c.diloco_overlap_steps}")
    need(c.diloco_overlap_steps == 0 or c.diloco_inner_steps > 0,
         f"comm.diloco_overlap_steps: {c.diloco_overlap_steps} overlaps DiLoCo's outer sync, but DiLoCo is off; "
         f"set comm.diloco_inner_steps > comm.diloco_overlap_steps, or comm.diloco_overlap_steps = 0")
    need(c.diloco_overlap_steps < max(1, c.diloco_inner_steps),
         f"comm.diloco_overlap_steps: must be below comm.diloco_inner_steps = {c.diloco_inner_steps} (a fragment's "
         f"sync must land before its next one starts), got {c.diloco_overlap_steps}")
    need(0.0 <= c.diloco_overlap_mix <= 1.0,
         f"comm.diloco_overlap_mix: must be in [0, 1] (share of the local weights kept when a sync lands; "
         f"0.5 in Streaming DiLoCo), got {c.diloco_overlap_mix}")
    need(c.diloco_inner_steps == 0 or c.grad == "fp32",
         f"comm.grad: '{c.grad}' compresses per-step gradient sync, which DiLoCo (comm.diloco_inner_steps="
         f"{c.diloco_inner_steps}) replaces; set comm.grad = \"fp32\" and compress the outer step with comm.diloco_compress")
    need(not (c.hierarchical and c.grad == "powersgd"),
         "comm.hierarchical: PowerSGD's low-rank factors are already small; use comm.hierarchical = false with powersgd")
    need(c.node_size >= 0, f"comm.node_size: must be >= 0 (0 = group ranks by hostname), got {c.node_size}")
    need(isinstance(c.pp_compress_boundaries, list) and all(isinstance(b, int) and b >= 0
                                                            for b in c.pp_compress_boundaries),
         f"comm.pp_compress_boundaries: expected a list of stage indices (boundary b is between stages b and b+1), "
         f"got {c.pp_compress_boundaries!r}")


def _validate_hetero(cfg: JobConfig) -> None:
    if not cfg.hetero.groups:
        return
    from suanli.infra.hetero.settings import check_config

    try:
        check_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_config(cfg: JobConfig):
    from suanli.infra.model import preset

    explicit = {k: v for k, v in asdict(cfg.model).items() if k != "preset" and v is not None}
    try:
        return preset(cfg.model.preset, **explicit)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: JobConfig) -> str:
    lines = []
    for sname, values in cfg.to_dict().items():
        lines.append(f"[{sname}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


__all__ = ["JobConfig", "ConfigError", "load_config", "parse_set", "to_toml", "model_config", "validate"]
