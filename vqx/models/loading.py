"""Load the pipeline a model config names: a built-in tiny or synthetic Wan2.1, or a local diffusers folder
(never a hub id; the folder checks are the family's, vqx.models.wan.checkpoint)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..errors import UserError
from ..runtime import DTYPES, resolve_device

log = logging.getLogger(__name__)


def check_finite_weights(transformer) -> None:
    """A NaN/Inf weight would surface an hour later as NaN activations; name the first bad tensor now."""
    for name, p in list(transformer.named_parameters()) + list(transformer.named_buffers()):
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            hint = (" or a value too large for float16: try model.dtype=bfloat16" if p.dtype == torch.float16 else "")
            raise UserError(f"transformer weight {name} holds {bad} NaN/Inf value(s); the checkpoint is corrupt{hint} -- "
                            "copy it again from the original model")


def load_pipeline(model: DictConfig):
    """The pipeline on ``model.device``; transformer in ``model.dtype``, VAE and encoders fp32 (VAE) as Wan runs them."""
    dtype = DTYPES[model.dtype]
    device = resolve_device(model.device)
    if model.source == "tiny":
        from .wan.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(model.task, seed=model.seed, dtype=dtype)
    elif model.source == "synthetic":
        from .wan.synthetic import build_synthetic_pipeline

        # built on the device: random init of 14B on a CPU takes minutes (the .to(device) below is then a no-op)
        pipe = build_synthetic_pipeline(model.arch, dtype, device, model.num_layers, seed=model.seed)
    else:
        from .wan.checkpoint import check_mini_folder, load_diffusers_folder

        if model.source == "mini":  # says how to train it; then the checks of any diffusers folder apply
            check_mini_folder(Path(model.path).expanduser())
        pipe = load_diffusers_folder(Path(model.path).expanduser(), model.task, dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if model.source in ("diffusers", "mini"):
        check_finite_weights(pipe.transformer)  # on the device: fast even for 14B
    outliers = model.get("outliers")
    if outliers and outliers.channels:
        from .wan.outliers import inject_outliers

        inject_outliers(pipe.transformer, int(outliers.channels), float(outliers.scale), int(outliers.seed))
    return pipe
