"""AWQ for any scheme: per input group, s = mean|X|^ratio (normalized), the ratio searched on a grid 0, 1/grid, ...,
1 (ratio 0 is s = 1: the identity). The grid is ranked by the group's output error with quantized weights AND
activations, summed over all the token sample (not the first sample only); the ``shortlist`` best ratios are then
scored on the quantized block's output over calibration calls (`block_search`; 0: every ratio), group after group,
and a group keeps the identity unless one lowers the block error. Scales are placed as in SmoothQuant. Optional
clipping search per weight scale block, kept per linear only where it lowers the block error.
"""

from __future__ import annotations

import torch

from ..quant.scheme import choose_scales, dequantize, global_scale_of, quantize_with
from .block_search import shortlisted
from .losses import GroupQuantLoss
from .params import AWQParams, accepts, recorded_t
from .registry import BlockContext, register_step
from .smoothing import apply_smoothing, clamp_scale, smoothable


def awq_scale(mean_abs: torch.Tensor, ratio: float) -> torch.Tensor:
    s = mean_abs.float().clamp(min=1e-5).pow(ratio)
    s = s / (s.max() * s.min()).sqrt()  # centre the factors around 1 so weights and activations share them
    return clamp_scale(s)


@register_step("awq", params=AWQParams, needs=frozenset({"mean_abs", "samples", "block_error"}))
def awq(ctx: BlockContext) -> None:
    ratios = [i / ctx.params.grid for i in range(ctx.params.grid + 1)]
    current = ctx.block_error()  # the block as it is: every group's identity (ratio 0)
    for group in ctx.groups:
        if not smoothable(group, ctx.params.groups):
            continue
        stats = ctx.stats[group.name]
        x = stats.sample_matrix()
        weights = [lin.weight.detach() for lin in ctx.group_linears(group)]
        schemes = [ctx.search_scheme(n) for n in group.linears]
        device = weights[0].device
        scale = {r: awq_scale(stats.mean_abs, r).to(device) for r in ratios}
        loss = GroupQuantLoss(x, weights, schemes)
        losses = {r: loss(scale[r]) for r in ratios}
        errors = {r: ctx.block_error(lambda c, s=scale[r], g=group: apply_smoothing(c, g, s))
                  for r in shortlisted({r: v for r, v in losses.items() if r > 0}, ctx.params.shortlist)}
        best = min(errors, key=errors.get) if errors else 0.0
        choice = {"block_error_identity": current, "loss_ratio0": losses[0.0],
                  "gain_t": recorded_t(errors[best], current) if best > 0 else 0.0}
        if best > 0 and accepts(errors[best], current, ctx.params.min_gain, ctx.params.min_t):
            apply_smoothing(ctx, group, scale[best])
            current = errors[best]
        else:
            best = 0.0
        ctx.choices.setdefault(group.name, {}).update(choice, ratio=best, loss=losses[best], block_error=current)
    if ctx.params.clip:
        search_clipping(ctx, current)


@torch.no_grad()
def search_clipping(ctx: BlockContext, current: float) -> None:
    """Per weight scale block (an output channel, a group, a 2-D block), the clip ratio of its absmax that minimizes
    the block's share of the output error on samples: the error of output row r restricted to the block's input
    columns, summed over the block's rows (ratio 1, no clipping, is on the grid). A global scale (NVFP4) stays the
    unclipped weight's. A linear keeps its clipped codes only where they lower the quantized block's output error
    ``current`` (`block_search`), linear by linear."""
    ratios = [1.0 - i * (1.0 - ctx.params.clip_min) / ctx.params.clip_grid for i in range(ctx.params.clip_grid + 1)]
    for group in ctx.groups:
        x = ctx.stats[group.name].sample_matrix()
        for local in group.linears:
            scheme = ctx.schemes.get(local)
            if local not in ctx.targets or scheme is None:
                continue
            ts = scheme.weight
            w = ctx.block.get_submodule(local).weight.detach().float()
            xs = x.to(w.device)
            rows, cols = ts.block_size(tuple(w.shape))
            n_row, n_col = w.shape[0] // rows, w.shape[1] // cols
            best_err = torch.full((n_row, n_col), float("inf"), device=w.device)
            scale_best = torch.ones((n_row, n_col), device=w.device)
            ratio_best = torch.ones((n_row, n_col), device=w.device)
            codes_best = torch.zeros_like(w)
            ref = xs @ w.T if n_col == 1 else None
            g = global_scale_of(w, ts) if ts.global_scale else None
            for r in ratios:
                scale = choose_scales(w, ts, g, clip=r)
                codes = quantize_with(w, ts, scale, g)
                wdq = dequantize(codes, scale, ts)
                if n_col == 1:  # per channel: the whole row's output error
                    err = ((xs @ wdq.T) - ref).pow(2).sum(dim=0)[:, None]
                else:  # [out, n_col]: each column block's share of each output row's error
                    err = torch.stack([(xs[:, j * cols:(j + 1) * cols] @ (wdq - w)[:, j * cols:(j + 1) * cols].T)
                                       .pow(2).sum(dim=0) for j in range(n_col)], dim=1)
                err = err.reshape(n_row, rows, n_col).sum(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                scale_best = torch.where(better, scale, scale_best)
                ratio_best = torch.where(better, torch.full_like(ratio_best, r), ratio_best)
                mask = better.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)
                codes_best = torch.where(mask, codes, codes_best)
            name, codes = ctx.full_name(local), (codes_best, scale_best)
            error = ctx.block_error(lambda c, name=name, codes=codes: c.chosen_codes.update({name: codes}))
            kept = accepts(error, current, ctx.params.min_gain, ctx.params.min_t)  # a tie keeps round-to-nearest's codes
            if kept:
                ctx.chosen_codes[name] = codes
                current = error
            ctx.choices.setdefault(local, {}).update(clip_ratio_mean=float(ratio_best.mean()) if kept else 1.0,
                                                     clip_searched_ratio_mean=float(ratio_best.mean()), clip_kept=kept)
