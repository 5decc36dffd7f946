"""SmoothQuant: per input group, s = max|X|^alpha / max|W|^(1-alpha), placed by `smoothing.py`.

``alpha`` is a number in [0, 1], or "auto": a per-group grid search (0, 0.05, ..., 1) that minimizes the
group's quantized output error on the calibration samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .losses import group_quant_loss
from .registry import BlockContext, register_step
from .smoothing import apply_smoothing, clamp_scale, group_weight_absmax, smoothable

ALPHA_GRID = [round(0.05 * i, 2) for i in range(21)]


@dataclass
class SmoothQuantParams:
    alpha: Any = field(default=0.75, metadata={"range": (0.0, 1.0), "or_auto": True})  # or "auto"


def parse_alpha(value: Any) -> float | str:
    if value == "auto":
        return "auto"
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"algorithm.alpha={value!r} must be a number in [0, 1] or 'auto'") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"algorithm.alpha={value!r} is out of range; it must be in [0, 1] or 'auto'")
    return alpha


def smoothquant_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    act = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().to(act.device).clamp(min=1e-5)
    return clamp_scale(act.pow(alpha) / w.pow(1.0 - alpha))


def _needs(params: SmoothQuantParams) -> frozenset[str]:
    # a fixed alpha reads only the absmax; "auto" searches over the token sample
    return frozenset({"absmax", "samples"} if parse_alpha(params.alpha) == "auto" else {"absmax"})


@register_step("smoothquant", params=SmoothQuantParams, needs=_needs)
def smoothquant(ctx: BlockContext) -> None:
    alpha_cfg = parse_alpha(ctx.params.alpha)
    for group in ctx.groups:
        if not smoothable(group):
            continue
        stats = ctx.stats[group.name]
        w_absmax = group_weight_absmax(ctx, group)
        if alpha_cfg == "auto":
            x = stats.sample_matrix()
            weights = [lin.weight.detach() for lin in ctx.group_linears(group)]
            schemes = [ctx.search_scheme(n) for n in group.linears]
            losses = {a: group_quant_loss(x, weights, schemes,
                                          smoothquant_scale(stats.absmax, w_absmax, a).to(weights[0].device))
                      for a in ALPHA_GRID}
            alpha = min(losses, key=losses.get)
            ctx.choices.setdefault(group.name, {}).update(alpha=alpha, loss=losses[alpha], loss_alpha0=losses[0.0])
        else:
            alpha = alpha_cfg
            ctx.choices.setdefault(group.name, {})["alpha"] = alpha
        apply_smoothing(ctx, group, smoothquant_scale(stats.absmax, w_absmax, alpha))
