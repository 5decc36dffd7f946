"""vqx: post-training quantization experiments for video diffusion transformers.

``vqx.Experiment(...)`` runs the stages from Python (vqx.api); ``python run.py`` from the shell."""

__version__ = "0.1.0"
__all__ = ["Experiment", "compose", "__version__"]


def __getattr__(name: str):
    if name in ("Experiment", "compose"):  # imported on first use: `import vqx` stays light
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vqx' has no attribute {name!r}")
