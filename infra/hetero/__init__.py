"""suanli.infra.hetero: one training job across device types whose collective libraries
cannot talk (NVIDIA + Ascend, Cambricon, Hygon, Moore Threads).

The job is cut so that every collective stays inside one vendor's device group and only
point-to-point pipeline traffic (and, when the layout asks for it, a cross-vendor gradient
sum) crosses vendors, through a host-staged gloo bridge.

Choices, and where they live:
- Schedule (engine.py): GPipe with explicit messages, because torch.distributed.pipelining
  needs the same tp on every stage. A boundary between tp=a and tp=b sends each sender's
  sequence shard straight to the receivers whose rows and positions overlap it.
- Data parallelism (gradsync.py): both layouts work. Kept inside a vendor (each stage on
  one group) it is a plain all-reduce on that vendor's backend; across vendors (a stage on
  several groups) the leaders sum the full gradient on the host through the bridge, with
  the low-bandwidth reducer's bf16/int8 codecs. bench/hetero.py measures both.
- Balance (balance.py): layers per stage and rows per replica from per-device speeds
  (config, peak-FLOPS table, or measured), with the GPipe bubble it predicts.
- Checkpoints: stage modules keep the full model's parameter names, so the DCP checkpoint
  of a heterogeneous run loads into any homogeneous layout and back. A stage held by
  groups with different tp cannot be saved (config error, unless checkpoints are off).
- Testing here: backends/emulated.py's "cpu-emulated" is a second device type with its own
  process groups, optionally slowed (SUANLI_EMULATED_SLOWDOWN).

The Trainer's seam: `ctx, pmodel = build_hetero(cfg)` replaces `init()` + `parallelize()`
(see build.py for what each object offers). Modules:
- layout.py    device groups, replicas, rows per replica, boundary messages (pure data)
- balance.py   speeds, layers per stage, rows per replica, the predicted bubble
- groups.py    process groups: vendor backends inside a group, gloo bridges across
- bridge.py    device link and host bridge transports, bf16 / int8 codecs
- engine.py    the GPipe engine with explicit messages (different tp on each side)
- gradsync.py  gradient sums inside and across vendors, the global gradient norm
- settings.py  config checks for [hetero]
- build.py     build_hetero(cfg) -> (HeteroContext, HeteroModel)
"""

from suanli.infra.hetero.build import HeteroContext, HeteroModel, build_hetero
from suanli.infra.hetero.layout import DeviceGroup, HeteroPlan, LayoutError

__all__ = ["DeviceGroup", "HeteroContext", "HeteroModel", "HeteroPlan", "LayoutError", "build_hetero"]
