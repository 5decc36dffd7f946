"""AWQ for W8A8/FP8: per input group, s = mean|X|^ratio (normalized), the ratio chosen on a grid by the
group's output error with quantized weights AND activations, summed over all calibration samples (not
the first sample only). Scales are placed as in SmoothQuant. Optional per-output-channel clipping search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.schema import AlgorithmSchema, bounded, register_schema
from ..quant.numbers import div_exact
from .losses import group_quant_loss
from .registry import BlockContext, register_step
from .smoothing import apply_smoothing, clamp_scale, smoothable


@dataclass
class AWQSchema(AlgorithmSchema):
    grid: int = bounded(20, 1, 1000)  # ratios 0, 1/grid, ..., 1
    clip: bool = False  # search a per-output-channel weight clipping ratio
    clip_min: float = bounded(0.8, 0.0, 1.0, exclusive_low=True)
    clip_grid: int = bounded(10, 1, 100)


register_schema("algorithm", "awq", AWQSchema)


def awq_scale(mean_abs: torch.Tensor, ratio: float) -> torch.Tensor:
    s = mean_abs.float().clamp(min=1e-5).pow(ratio)
    s = s / (s.max() * s.min()).sqrt()  # centre the factors around 1 so weights and activations share them
    return clamp_scale(s)


@register_step("awq")
def awq(ctx: BlockContext) -> None:
    ratios = [i / ctx.params.grid for i in range(ctx.params.grid + 1)]
    for group in ctx.groups:
        if not smoothable(group):
            continue
        stats = ctx.stats[group.name]
        x = stats.sample_matrix()
        weights = [lin.weight.detach() for lin in ctx.group_linears(group)]
        device = weights[0].device
        losses = {r: group_quant_loss(x, weights, ctx.search_format, awq_scale(stats.mean_abs, r).to(device))
                  for r in ratios}
        best = min(losses, key=losses.get)  # ratio 0 is s = 1 (RTN): the chosen loss is never above it
        ctx.choices.setdefault(group.name, {}).update(ratio=best, loss=losses[best], loss_ratio0=losses[0.0])
        apply_smoothing(ctx, group, awq_scale(stats.mean_abs, best).to(device))
    if ctx.params.clip and ctx.format.quantizes:
        search_clipping(ctx)


@torch.no_grad()
def search_clipping(ctx: BlockContext) -> None:
    """Per output channel, the clip ratio (of absmax) minimizing that channel's output error on samples."""
    grid = ctx.format.weight_grid
    ratios = [1.0 - i * (1.0 - ctx.params.clip_min) / ctx.params.clip_grid for i in range(ctx.params.clip_grid + 1)]
    for group in ctx.groups:
        x = ctx.stats[group.name].sample_matrix()
        for local in group.linears:
            if local not in ctx.targets:
                continue
            w = ctx.block.get_submodule(local).weight.detach().float()
            xs = x.to(w.device)
            ref = xs @ w.T
            absmax = w.abs().amax(dim=1, keepdim=True)
            best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
            codes_best = torch.zeros_like(w)
            scale_best = torch.ones_like(absmax)
            ratio_best = torch.ones(w.shape[0], device=w.device)
            for r in ratios:
                scale = div_exact(absmax * r, grid.qmax).to(torch.bfloat16).float()
                scale = torch.where(absmax == 0, torch.ones_like(scale), scale)
                codes = grid.codes(w, scale)
                err = ((xs @ (codes * scale).T) - ref).pow(2).sum(dim=0)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                codes_best[better] = codes[better]
                scale_best[better] = scale[better]
                ratio_best[better] = r
            ctx.chosen_codes[ctx.full_name(local)] = (codes_best, scale_best)
            ctx.choices.setdefault(local, {})["clip_ratio_mean"] = float(ratio_best.mean())
