"""Every built-in config schema, registered in Hydra's ConfigStore without importing torch: Hydra composes a run's
config and `config.validate.check_settings` checks its values (and ``--help`` answers) in about a second, before
the stages (`vqx.plugins`: torch, diffusers) are imported."""

from . import gpus  # noqa: F401  (the ${vqx_gpu_count:} resolver of hydra/launcher=gpus)
from .algorithms import params  # noqa: F401  (algorithm steps' parameters: the recipe schema)
from .config import schema  # noqa: F401  (the groups' base schemas, the ${vqx_repo:} resolvers)
from .eval import schemas as eval_schemas  # noqa: F401  (eval=video)
from .export import schemas as export_schemas  # noqa: F401  (export=lightx2v, export=dequantized)
from .track import schemas as track_schemas  # noqa: F401  (logger=wandb)
