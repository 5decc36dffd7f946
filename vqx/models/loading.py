"""Load the pipeline a model config names through its family's adapter (``model.family``): a model built in
code, or a local folder (never a hub id; the folder checks are the family's, e.g. vqx.models.wan.checkpoint)."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from ..errors import UserError
from ..runtime import resolve_device, torch_dtype
from .adapter import adapter_named

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
    """The pipeline on ``model.device``, built or loaded by its family's adapter; transformer in ``model.dtype``,
    VAE and encoders as the family runs them."""
    adapter = adapter_named(model.family)
    dtype = torch_dtype(model.dtype)
    device = resolve_device(model.device)
    pipe = adapter.build_pipeline(model, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if model.source in ("diffusers", "mini"):
        check_finite_weights(pipe.transformer)  # on the device: fast even for 14B
    outliers = model.get("outliers")
    if outliers and outliers.channels:
        adapter.inject_outliers(pipe.transformer, int(outliers.channels), float(outliers.scale), int(outliers.seed),
                                list(outliers.sites))
    return pipe
