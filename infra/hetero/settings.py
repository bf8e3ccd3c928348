"""Checks of the [hetero] config section that need no processes: called from
`infra.config.validate`, so a bad layout fails before anything is launched."""

from __future__ import annotations

from suanli.infra.hetero.balance import BALANCE_MODES
from suanli.infra.hetero.bridge import BRIDGE_CODECS
from suanli.infra.hetero.layout import DeviceGroup, LayoutError, check_layout, parse_groups


def known_devices(emulated: bool) -> tuple[str, ...]:
    from suanli.backends import BACKENDS
    from suanli.backends.emulated import NAME

    names = tuple(BACKENDS)
    return names + ((NAME,) if emulated and NAME not in names else ())


def check_tp(model_cfg, g: DeviceGroup, seq_len: int) -> None:
    from suanli.infra.tensor_parallel import check_tp_degree

    try:
        check_tp_degree(model_cfg, g.tp)
    except ValueError as e:
        raise LayoutError(str(e).replace("parallel.tp", f"{g.where}.tp")) from None
    if seq_len % g.tp:
        raise LayoutError(f"{g.where}.tp: {g.tp} does not divide train.seq_len={seq_len}; sequence parallel "
                          f"splits every sequence evenly across the tp ranks")


def check_layers(layers, n_stages: int, n_layers: int) -> list[int]:
    if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise LayoutError(f"hetero.layers: expected a list of layer counts per stage, got {layers!r}")
    if not layers:
        return []
    if len(layers) != n_stages:
        raise LayoutError(f"hetero.layers: {layers} has {len(layers)} entries but the groups define {n_stages} stages")
    if any(x < 1 for x in layers):
        raise LayoutError(f"hetero.layers: {layers} has an empty stage; every stage needs at least one layer")
    if sum(layers) != n_layers:
        raise LayoutError(f"hetero.layers: {layers} sums to {sum(layers)} but model.n_layers={n_layers}")
    return list(layers)


def check_checkpointable(groups: list[DeviceGroup], n_stages: int, every_steps: int) -> None:
    """DCP saves a tensor once per layout: groups holding the same stage (data parallel
    across vendors) must shard it alike, or their copies collide in the checkpoint."""
    if every_steps <= 0:
        return
    for s in range(n_stages):
        holders = [g for g in groups if s in g.stages]
        if len({g.tp for g in holders}) > 1:
            desc = ", ".join(f"{g.where}.tp = {g.tp}" for g in holders)
            raise LayoutError(f"hetero.groups: stage {s} is held by groups with different tp ({desc}); a checkpoint "
                              f"stores each stage in one layout, so give them the same tp, or set "
                              f"checkpoint.every_steps = 0 to train without checkpoints")


def check_config(cfg) -> list[DeviceGroup]:
    """Everything about [hetero] that can be checked from the config alone."""
    from suanli.backends.emulated import NAME
    from suanli.infra.config import model_config

    h, p = cfg.hetero, cfg.parallel
    if h.balance not in BALANCE_MODES:
        raise LayoutError(f"hetero.balance: '{h.balance}' is not one of {', '.join(BALANCE_MODES)}")
    if h.bridge_compress not in BRIDGE_CODECS:
        raise LayoutError(f"hetero.bridge_compress: '{h.bridge_compress}' is not one of {', '.join(BRIDGE_CODECS)}")
    raw = h.groups
    if isinstance(raw, list) and not h.emulated:
        for i, g in enumerate(raw):
            if isinstance(g, dict) and g.get("device") == NAME:
                raise LayoutError(f"hetero.groups[{i}].device: '{NAME}' is the emulated test accelerator; set "
                                  f"hetero.emulated = true to register it (it is never selected automatically)")
    groups = parse_groups(raw, known_devices(h.emulated))
    given = [g for g in groups if g.speed]
    if given and len(given) != len(groups):
        g = next(g for g in groups if not g.speed)
        raise LayoutError(f"{g.where}.speed: some groups give a speed and this one does not; give every group a "
                          f"speed or none (then hetero.balance measures or looks them all up: speeds from "
                          f"different sources are not comparable)")
    for name, value, default in (("tp", p.tp, 1), ("pp", p.pp, 1), ("dp_replicate", p.dp_replicate, 1)):
        if value != default:
            raise LayoutError(f"parallel.{name}: {value} is set, but with [[hetero.groups]] each group sets its own "
                              f"tp / dp / stages; leave parallel.{name} at {default}")
    if p.dp_shard not in (-1, 1):
        raise LayoutError(f"parallel.dp_shard: {p.dp_shard} is set, but with [[hetero.groups]] data parallelism is "
                          f"each group's dp; leave parallel.dp_shard at -1")
    if p.pp_layers:
        raise LayoutError("parallel.pp_layers: with [[hetero.groups]] give the split as hetero.layers (or let "
                          "hetero.balance choose it)")
    c = cfg.comm
    if c.grad != "fp32" or c.diloco_inner_steps or c.pp_compress != "none":
        raise LayoutError("comm: the heterogeneous engine synchronises gradients and stage traffic itself; leave "
                          "comm.grad = \"fp32\", comm.diloco_inner_steps = 0 and comm.pp_compress = \"none\", and "
                          "compress bridge traffic with hetero.bridge_compress")
    model_cfg = model_config(cfg)
    n_stages = check_layout(groups, model_cfg.n_layers) if all(g.ranks for g in groups) else \
        max(g.stages[-1] for g in groups) + 1
    for g in groups:
        check_tp(model_cfg, g, cfg.train.seq_len)
    layers = check_layers(h.layers, n_stages, model_cfg.n_layers)
    check_checkpointable(groups, n_stages, cfg.checkpoint.every_steps)
    if all(g.ranks for g in groups):  # rows per replica: every replica needs at least one
        from suanli.infra.hetero.layout import HeteroPlan
        from suanli.infra.pipeline import split_layers

        HeteroPlan(groups, n_stages, layers or split_layers(model_cfg.n_layers, n_stages, []), cfg.train.global_batch,
                   cfg.train.seq_len, default_micro_batch=cfg.train.micro_batch).replicas
    return groups


__all__ = ["check_checkpointable", "check_config", "check_layers", "check_tp", "known_devices"]
