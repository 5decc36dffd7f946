"""vqx: post-training quantization experiments for video diffusion transformers.

From Python (vqx.api): ``vqx.Experiment(...)`` runs the stages, ``vqx.load(export_dir, pipe)`` loads an export back;
from the shell: ``vqx run`` (``python run.py`` in a checkout)."""

__version__ = "0.1.0"
__all__ = ["Experiment", "compose", "load", "__version__"]


def __getattr__(name: str):
    if name in ("Experiment", "compose", "load"):  # imported on first use: `import vqx` stays light
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vqx' has no attribute {name!r}")
