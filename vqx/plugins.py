"""Imports every built-in stage so its registration (schema, step, exporter, evaluator, logger) runs."""

from . import algorithms, stages  # noqa: F401
from .config import schema  # noqa: F401
from .track import wandb_logger  # noqa: F401  (imports wandb only when a run starts)
from .eval import video  # noqa: F401  (eval=video)
from . import export  # noqa: F401  (export=lightx2v, export=dequantized)
from . import gpus  # noqa: F401  (the ${vqx_gpu_count:} resolver of hydra/launcher=gpus)
