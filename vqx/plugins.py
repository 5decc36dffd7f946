"""Imports every built-in stage so its registration (step, exporter, evaluator, logger) runs; their settings'
schemas come first, from `vqx.schemas` (torch-free)."""

from . import schemas, stages  # noqa: F401
from .algorithms import awq, gptq, rtn, smoothquant  # noqa: F401  (register the steps)
from .eval import video  # noqa: F401  (eval=video)
from .export import dequantized, diffusers_torchao, lightx2v  # noqa: F401  (export=dequantized, torchao, lightx2v)
from .track import wandb_logger  # noqa: F401  (imports wandb only when a run starts)
