"""Activation outliers injected into a Wan transformer without changing what it computes.

Real DiTs have a few input channels whose activations are 10-100x the others' (what SmoothQuant and AWQ
exist for); small models trained from scratch (wan_mini) have hardly any. `inject_outliers` scales chosen
channels of the inputs of the sites' linears by ``scale`` and divides the matching weight columns by it. The sites,
named by the input group they feed (`layers.input_groups`; ``model.outliers.sites``):

- ``cross_attn_q`` (attn2.to_q's input): the affine cross-attention norm (``norm2``) weight and bias of the
  channel times ``scale``, ``attn2.to_q`` column divided;
- ``self_attn_out``, ``cross_attn_out`` (the attention output projections' inputs): ``to_v`` row (weight and bias)
  of the channel times ``scale`` (attention mixes each value channel linearly), ``to_out.0`` column divided;
- ``ffn_out`` (ffn.net.2's input, after the GELU, where real DiTs' largest outliers sit): no weight can hold the
  factor (the GELU is not linear), so the FFN's dropout slot (``ffn.net.1``, the identity at inference) becomes a
  `ChannelScale` that multiplies the chosen channels of the GELU output; ``ffn.net.2`` column divided. No Wan2.1
  checkpoint holds that vector, so a model with this site cannot be exported (`structure_change` says why);
- ``cross_attn_text`` (attn2.to_k/to_v's input, the text embedding every block reads): the text embedder's last
  linear (``condition_embedder.text_embedder.linear_2``) row of the channel times ``scale``, the ``to_k`` and
  ``to_v`` columns of every block divided; one set of channels for the whole model, since the blocks share it.

The default sites are the first three (the first two kinds can be smoothed exactly; see smoothing.py).
``scale`` is a power of two, so every scaled weight is exact (no rounding in bf16/fp16/fp32 while the values
stay normal): the float model's outputs are unchanged bit for bit (each product x_c * w_c is the same
number), while per-token activation quantization now sees channels ``scale`` times larger than the rest.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import UserError

# site -> the block linears whose input gets outlier channels, in the order their channels are drawn
BLOCK_SITES = {
    "cross_attn_q": ("attn2.to_q",),
    "self_attn_out": ("attn1.to_out.0",),
    "cross_attn_out": ("attn2.to_out.0",),
    "ffn_out": ("ffn.net.2",),
}
TEXT_SITE = {"cross_attn_text": ("attn2.to_k", "attn2.to_v")}
ALL_SITES = (*BLOCK_SITES, *TEXT_SITE)
DEFAULT_SITES = ("cross_attn_q", "self_attn_out", "cross_attn_out")
SITES = tuple(BLOCK_SITES[s][0] for s in DEFAULT_SITES)  # the default sites' linears


def check_scale(scale: float) -> None:
    if scale < 2 or not float(math.log2(scale)).is_integer():
        raise UserError(f"model.outliers.scale={scale:g} must be a power of two >= 2 (2, 4, ..., 64): only then is "
                        "the float model unchanged bit for bit")


def check_sites(sites) -> None:
    bad = [s for s in sites if s not in ALL_SITES]
    if bad or not sites:
        raise UserError(f"model.outliers.sites={list(sites)} {'names no site' if not sites else f'has unknown site {bad[0]!r}'}; "
                        f"valid: {', '.join(ALL_SITES)}")


def structure_change(sites) -> str | None:
    """Why a model with outliers at ``sites`` holds a module no Wan2.1 checkpoint has (None: it does not)."""
    if "ffn_out" in sites:
        return ("the ffn_out site multiplies the GELU output by a per-channel vector (ffn.net.1) that no Wan2.1 "
                "checkpoint holds")
    return None


class ChannelScale(nn.Module):
    """``x`` with chosen channels (the last dim) multiplied by a power of two: exact, so the float model is unchanged
    once the next linear's columns are divided by it. Not in the state dict (no checkpoint has it)."""

    def __init__(self, dim: int, channels: torch.Tensor, scale: float):
        super().__init__()
        factor = torch.ones(dim)
        factor[channels] = scale
        self.register_buffer("factor", factor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor.to(x.dtype)


@torch.no_grad()
def inject_outliers(transformer: nn.Module, channels: int, scale: float, seed: int = 0,
                    sites=DEFAULT_SITES) -> dict[str, list[int]]:
    """Give ``channels`` random input channels (seeded, per block and site; one set for the shared text site) of
    each site's linears ``scale`` times larger activations; returns {linear name: channels}. A site's channels do not
    depend on which other sites are chosen."""
    check_scale(scale)
    check_sites(sites)
    # the default sites draw from the seed's stream as they always did; the others from streams of their own, so
    # adding a site never moves another site's channels
    streams = {site: torch.Generator().manual_seed(seed if site in DEFAULT_SITES else seed * 1_000_003 + k + 1)
               for k, site in enumerate(ALL_SITES)}
    g = streams["cross_attn_q"]
    for site in DEFAULT_SITES:
        streams[site] = g
    chosen: dict[str, list[int]] = {}
    for i, block in enumerate(transformer.blocks):
        if "cross_attn_q" in sites and (not isinstance(getattr(block, "norm2", None), nn.LayerNorm)
                                        or block.norm2.weight is None):
            raise UserError(f"model.outliers at cross_attn_q needs Wan blocks with an affine cross-attention norm "
                            f"(cross_attn_norm=True); block {i} has {type(getattr(block, 'norm2', None)).__name__} "
                            "without weights")
        pick = {}
        for site in (s for s in BLOCK_SITES if s in sites):  # a fixed order: the default sites draw as they always did
            dim = block.get_submodule(BLOCK_SITES[site][0]).in_features
            _check_channels(channels, dim, site)
            pick[site] = torch.randperm(dim, generator=streams[site])[:channels].sort().values
        if "cross_attn_q" in pick:
            _scale_(block.norm2.weight, pick["cross_attn_q"], scale)
            _scale_(block.norm2.bias, pick["cross_attn_q"], scale)
            _scale_columns_(block.attn2.to_q.weight, pick["cross_attn_q"], 1 / scale)
        for attn, site in ((block.attn1, "self_attn_out"), (block.attn2, "cross_attn_out")):
            if site in pick:
                _scale_(attn.to_v.weight, pick[site], scale)
                _scale_(attn.to_v.bias, pick[site], scale)
                _scale_columns_(attn.to_out[0].weight, pick[site], 1 / scale)
        if "ffn_out" in pick:
            net = block.ffn.net
            if not isinstance(net[1], nn.Dropout):
                raise UserError(f"model.outliers at ffn_out: block {i}'s FFN has {type(net[1]).__name__} after its "
                                "activation, not the dropout slot it uses")
            net[1] = ChannelScale(net[2].in_features, pick["ffn_out"], scale).to(net[2].weight.device)
            _scale_columns_(net[2].weight, pick["ffn_out"], 1 / scale)
        chosen.update({f"blocks.{i}.{BLOCK_SITES[site][0]}": c.tolist() for site, c in pick.items()})
    if "cross_attn_text" in sites:
        text = transformer.condition_embedder.text_embedder.linear_2
        _check_channels(channels, text.out_features, "cross_attn_text")
        pick = torch.randperm(text.out_features, generator=streams["cross_attn_text"])[:channels].sort().values
        _scale_(text.weight, pick, scale)
        _scale_(text.bias, pick, scale)
        for i, block in enumerate(transformer.blocks):
            for name in TEXT_SITE["cross_attn_text"]:
                _scale_columns_(block.get_submodule(name).weight, pick, 1 / scale)
                chosen[f"blocks.{i}.{name}"] = pick.tolist()
    return chosen


def _check_channels(channels: int, dim: int, site: str) -> None:
    if not 0 < channels <= dim:
        raise UserError(f"model.outliers.channels={channels} must be between 1 and the width of the {site} input, {dim}")


def _scale_(t: torch.Tensor | None, rows: torch.Tensor, factor: float) -> None:
    if t is not None:
        t[rows.to(t.device)] *= factor


def _scale_columns_(w: torch.Tensor, cols: torch.Tensor, factor: float) -> None:
    w[:, cols.to(w.device)] *= factor
