"""Calibrated activation values: the static scale of a static per-tensor scheme (fp8_static) and the global scale
of an NVFP4-style scheme, chosen per input group from the statistics over the whole calibration capture.

``calib.act_statistic`` picks the absmax the value is computed from:
- ``absmax``: the group's absmax over every calibration call (lightx2v's ``CalibMax``);
- ``percentile``: the ``calib.act_percentile``-th percentile of the per-token absmax of the group's token
  sample (tokens above it saturate);
- ``mse``: of the clipped absmaxes ``absmax x r``, r = 1, ..., ``calib.act_clip_min`` (``calib.act_grid`` steps),
  the one whose value gives the lowest quantized output error of the group's linears on the token sample
  (weights as they will be quantized: the step's chosen codes, else round to nearest); the absmax wins ties.
The value is then the scheme's: ``absmax / qmax`` in its scale dtype (static), or (NVFP4) the absmax itself,
rounded to bf16 as lightx2v's loader reads ``input_absmax`` (QuantLinear derives the global scale from it).
Linears of a group that share an activation scheme share the value, so the group's input is quantized once.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..quant.linear import quantize_weight
from ..quant.scheme import TensorScheme, choose_scales, dequantize, fake_quantize, nvfp4_global_scale
from .registry import BlockContext

STATISTICS = ("absmax", "percentile", "mse")


def value_of(amax: torch.Tensor, act: TensorScheme) -> torch.Tensor:
    """The calibrated per-tensor value of activation scheme ``act`` for an absmax (fp32 scalar): what `QuantLinear`
    takes as ``input_scale``."""
    amax = amax.detach().float().reshape(())
    if act.global_scale:
        return amax.to(torch.bfloat16).float()
    return choose_scales(amax.reshape(1, 1), TensorScheme(act.grid, "tensor", scale_dtype=act.scale_dtype,
                                                          amax_floor=act.amax_floor)).reshape(())


def needs_samples(calib) -> bool:
    return calib.get("act_statistic", "absmax") != "absmax"


@torch.no_grad()
def _output_error(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], act: TensorScheme,
                  value: torch.Tensor, chunk: int = 4096) -> float:
    err = 0.0
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]
        xq = fake_quantize(xb, act, value)
        for w, wdq in layers:
            err += float(((xq @ wdq.T) - (xb @ w.T)).pow(2).sum())
    return err


def _candidates(amax: torch.Tensor, calib) -> list[torch.Tensor]:
    grid, low = int(calib.act_grid), float(calib.act_clip_min)
    return [amax * (1.0 - k * (1.0 - low) / grid) for k in range(grid + 1)]


@torch.no_grad()
def calibrated_input_scales(ctx: BlockContext, calib, schemes: dict | None = None) -> dict[str, torch.Tensor]:
    """Full name -> calibrated activation value of each target whose activation scheme (``schemes``, default the
    block's) needs one, from the current statistics (after the block's smoothing, which rescales them) and the
    current weights. Statistics without a token sample (a block search's scratch copy) give the absmax's value."""
    schemes = ctx.schemes if schemes is None else schemes
    statistic = calib.get("act_statistic", "absmax")
    out: dict[str, torch.Tensor] = {}
    for group in ctx.groups:
        by_act: dict[TensorScheme, list[str]] = defaultdict(list)
        for local in group.linears:
            scheme = schemes.get(local)
            if local in ctx.targets and scheme is not None and scheme.activation is not None \
                    and scheme.activation.calibrated:
                by_act[scheme.activation].append(local)
        if not by_act:
            continue
        stats = ctx.stats[group.name]
        amax = stats.absmax.float().max()
        x = stats.sample_matrix() if statistic != "absmax" else None
        for act, locals_ in by_act.items():
            chosen = amax
            if x is not None and x.shape[0] > 0:
                if statistic == "percentile":
                    tokens = x.abs().amax(dim=1)
                    chosen = torch.quantile(tokens, float(calib.act_percentile) / 100.0).to(amax.device)
                else:
                    chosen = _search(ctx, schemes, locals_, act, x, amax, calib)
            value = value_of(chosen, act)
            ctx.choices.setdefault(group.name, {})["act_absmax"] = float(chosen)
            for local in locals_:
                out[ctx.full_name(local)] = value
    return out


def _quantizer_value(amax: torch.Tensor, act: TensorScheme) -> torch.Tensor:
    """What `fake_quantize` takes: the static scale, or the global scale of the (bf16) absmax."""
    value = value_of(amax, act)
    return nvfp4_global_scale(value) if act.global_scale else value


def _search(ctx: BlockContext, schemes: dict, locals_: list[str], act: TensorScheme, x: torch.Tensor,
            amax: torch.Tensor, calib) -> torch.Tensor:
    layers = []
    for local in locals_:
        lin = ctx.block.get_submodule(local)
        w = lin.weight.detach().float()
        chosen = ctx.chosen_codes.get(ctx.full_name(local))
        ts = schemes[local].weight
        codes, scale = chosen if chosen is not None else quantize_weight(w, ts)
        layers.append((w, dequantize(codes, scale, ts).to(w.device)))
    xs = x.to(layers[0][0].device)
    best, best_err = amax, None
    for cand in _candidates(amax, calib):
        err = _output_error(xs, layers, act, _quantizer_value(cand, act).to(xs.device))
        if best_err is None or err < best_err:
            best, best_err = cand, err
    return best
