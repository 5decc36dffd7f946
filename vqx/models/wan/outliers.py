"""Activation outliers injected into a Wan transformer without changing what it computes.

Real DiTs have a few input channels whose activations are 10-100x the others' (what SmoothQuant and AWQ
exist for); small models trained from scratch (wan_mini) have hardly any. `inject_outliers` scales chosen
channels of three linear inputs per block by ``scale`` and divides the matching weight columns by it:

- the cross-attention query's input: the affine cross-attention norm (``norm2``) weight and bias of the
  channel times ``scale``, ``attn2.to_q`` column divided;
- the self- and cross-attention output projections' inputs: ``to_v`` row (weight and bias) of the channel
  times ``scale`` (attention mixes each value channel linearly), ``to_out.0`` column divided.

``scale`` is a power of two, so every scaled weight is exact (no rounding in bf16/fp16/fp32 while the values
stay normal): the float model's outputs are unchanged bit for bit (each product x_c * w_c is the same
number), while per-token activation quantization now sees channels ``scale`` times larger than the rest.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import UserError

SITES = ("attn2.to_q", "attn1.to_out.0", "attn2.to_out.0")  # the linears whose inputs get outlier channels


def check_scale(scale: float) -> None:
    if scale < 2 or not float(math.log2(scale)).is_integer():
        raise UserError(f"model.outliers.scale={scale:g} must be a power of two >= 2 (2, 4, ..., 64): only then is "
                        "the float model unchanged bit for bit")


@torch.no_grad()
def inject_outliers(transformer: nn.Module, channels: int, scale: float, seed: int = 0) -> dict[str, list[int]]:
    """Give ``channels`` random input channels (seeded, per block and site) of each `SITES` linear ``scale``
    times larger activations; returns {linear name: channels}."""
    check_scale(scale)
    g = torch.Generator().manual_seed(seed)
    chosen: dict[str, list[int]] = {}
    for i, block in enumerate(transformer.blocks):
        if not isinstance(getattr(block, "norm2", None), nn.LayerNorm) or block.norm2.weight is None:
            raise UserError(f"model.outliers needs Wan blocks with an affine cross-attention norm (cross_attn_norm=True); "
                            f"block {i} has {type(getattr(block, 'norm2', None)).__name__} without weights")
        dim = block.norm2.weight.numel()
        if not 0 < channels <= dim:
            raise UserError(f"model.outliers.channels={channels} must be between 1 and the model width {dim}")
        pick = {site: torch.randperm(dim, generator=g)[:channels].sort().values for site in SITES}
        _scale_(block.norm2.weight, pick["attn2.to_q"], scale)
        _scale_(block.norm2.bias, pick["attn2.to_q"], scale)
        _scale_columns_(block.attn2.to_q.weight, pick["attn2.to_q"], 1 / scale)
        for attn, site in ((block.attn1, "attn1.to_out.0"), (block.attn2, "attn2.to_out.0")):
            _scale_(attn.to_v.weight, pick[site], scale)
            _scale_(attn.to_v.bias, pick[site], scale)
            _scale_columns_(attn.to_out[0].weight, pick[site], 1 / scale)
        chosen.update({f"blocks.{i}.{site}": pick[site].tolist() for site in SITES})
    return chosen


def _scale_(t: torch.Tensor | None, rows: torch.Tensor, factor: float) -> None:
    if t is not None:
        t[rows.to(t.device)] *= factor


def _scale_columns_(w: torch.Tensor, cols: torch.Tensor, factor: float) -> None:
    w[:, cols.to(w.device)] *= factor
