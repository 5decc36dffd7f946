"""Where vqx runs: its package data and cache, the torch device a setting names, the torch dtype a name names.

One helper each, for every module (vqx.quant included: this imports nothing of vqx but `errors`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where a device or dtype is made: settings are checked before that import
    import torch

# Model dtypes by the name configs and manifests use (model.dtype, a run config's model.dtype): torch's names.
DTYPES = ("bfloat16", "float16", "float32")


def package_root() -> Path:
    """The installed vqx package: conf/, sweeps/ and assets/ ship inside it (the checkout's top-level conf, sweeps
    and assets are links to them, so paths in a checkout read as before)."""
    return Path(__file__).resolve().parent


def package_path(relative: str) -> Path:
    """``relative`` inside the package, absolute (runs start anywhere)."""
    return package_root() / relative


def launched_distributed() -> bool:
    """The environment describes several processes (torchrun, Slurm), whether or not this one has joined them yet."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def user_cache_dir() -> Path:
    """Where runs cache captures and references unless cache_dir / VQX_CACHE_DIR says otherwise: the user's cache
    ($XDG_CACHE_HOME/vqx, else ~/.cache/vqx), so a run from another directory reads the same cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vqx"


def resolve_device(name: str, option: str = "model.device=") -> torch.device:
    """``name`` (auto | cpu | cuda | cuda:N) as a device; auto is cuda when one is visible, else cpu.
    ``option`` is how errors spell the setting (``model.device=``, ``--device ``)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option}{name} but no CUDA device is visible; use {option}cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}{name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None


def from_pretrained_dtype(dtype: "torch.dtype") -> dict:
    """diffusers' ``from_pretrained`` keyword for the model dtype: ``dtype`` where diffusers takes it (it deprecates
    ``torch_dtype`` with a warning on every load since 0.36-ish), else ``torch_dtype`` (older releases)."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def torch_dtype(name: str, default: torch.dtype | None = None) -> torch.dtype:
    """The dtype named ``name`` (one of `DTYPES`); ``default`` for an unknown name, else a one-line error."""
    import torch

    if name in DTYPES:
        return getattr(torch, name)
    if default is not None:
        return default
    raise UserError(f"dtype {name!r} is not valid; valid: {', '.join(DTYPES)}")
