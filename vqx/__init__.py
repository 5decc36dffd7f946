"""vqx: post-training quantization experiments for video diffusion transformers.

From Python (vqx.api): ``vqx.Experiment(...)`` runs the stages, ``vqx.load(export_dir, pipe)`` loads an export back;
from the shell: ``vqx run`` (``python run.py`` in a checkout)."""

import logging as _logging

__version__ = "0.1.0"
# Import-time notices of an optional package that are no concern of a vqx user: with torchao installed (export=torchao),
# importing diffusers imports it, and torch deprecates how torchao registers its enums, and diffusers misses torchao
# classes it only needs for torch.load checkpoints (vqx's exports are safetensors). Errors still show.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
__all__ = ["Experiment", "compose", "load", "__version__"]


def __getattr__(name: str):
    if name in ("Experiment", "compose", "load"):  # imported on first use: `import vqx` stays light
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vqx' has no attribute {name!r}")
