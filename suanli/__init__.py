"""suanli (算力): train large language models on mixed accelerator fleets.

What users import; everything else lives in suanli.backends / .infra / .fault / .bench.
"""

from suanli.backends import get_accelerator
from suanli.fault.checkpoint import Checkpointer
from suanli.infra.distributed import ParallelConfig, ParallelContext, init, shutdown
from suanli.infra.model import ModelConfig, Transformer
from suanli.infra.parallelize import parallelize
from suanli.infra.trainer import Trainer

__version__ = "0.1.0"

__all__ = ["get_accelerator", "init", "shutdown", "ParallelConfig", "ParallelContext", "ModelConfig", "Transformer",
           "parallelize", "Trainer", "Checkpointer"]
