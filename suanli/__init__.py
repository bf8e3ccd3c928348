"""suanli (算力): train large language models on mixed accelerator fleets.

What users import; everything else lives in suanli.backends / .infra / .fault / .bench.
Names load on first use: `suanli doctor` and every training rank start faster when the
pipeline schedules and DCP are imported only by the processes that use them.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "get_accelerator": "suanli.backends",
    "init": "suanli.infra.distributed",
    "shutdown": "suanli.infra.distributed",
    "ParallelConfig": "suanli.infra.distributed",
    "ParallelContext": "suanli.infra.distributed",
    "ModelConfig": "suanli.infra.model",
    "Transformer": "suanli.infra.model",
    "parallelize": "suanli.infra.parallelize",
    "Trainer": "suanli.infra.trainer",
    "Checkpointer": "suanli.fault.checkpoint",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'suanli' has no attribute {name!r}")
