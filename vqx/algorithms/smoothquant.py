"""SmoothQuant: per input group, s = max|X|^alpha / max|W|^(1-alpha), placed by `smoothing.py`.

``alpha`` is a number in [0, 1] (every smoothable group gets that factor: what sweeps set), or "auto": a per-group
search whose candidates are the identity (no factor) and the alphas of the grid 0, 0.05, ..., 1, scored on the
quantized block's output over calibration calls (`block_search`), group after group in the block's order, each
with the groups before it at their choice. ``shortlist`` bounds its cost: the grid's ``shortlist`` alphas with
the lowest per-linear output error (the group's own linears quantized, on the token sample) are scored on the
block (0: every alpha). A group keeps the identity unless a candidate lowers the block error (by more than
``min_gain`` of it), so the block error only goes down from round-to-nearest's; the runner checks the result on
every calibration call.
"""

from __future__ import annotations

import torch

from .block_search import shortlisted
from .losses import GroupQuantLoss
from .params import SmoothQuantParams, accepts, recorded_t, parse_alpha
from .registry import BlockContext, register_step
from .smoothing import apply_smoothing, clamp_scale, group_weight_absmax, smoothable

ALPHA_GRID = [round(0.05 * i, 2) for i in range(21)]


def smoothquant_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    act = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().to(act.device).clamp(min=1e-5)
    return clamp_scale(act.pow(alpha) / w.pow(1.0 - alpha))


def _needs(params: SmoothQuantParams) -> frozenset[str]:
    # a fixed alpha reads only the absmax; "auto" ranks the grid on the token sample and scores on the block output
    return frozenset({"absmax", "samples", "block_error"} if parse_alpha(params.alpha) == "auto" else {"absmax"})


@register_step("smoothquant", params=SmoothQuantParams, needs=_needs)
def smoothquant(ctx: BlockContext) -> None:
    alpha_cfg = parse_alpha(ctx.params.alpha)
    current = ctx.block_error() if alpha_cfg == "auto" else None  # the block as it is: every group's identity
    for group in ctx.groups:
        if not smoothable(group, ctx.params.groups):
            continue
        stats = ctx.stats[group.name]
        w_absmax = group_weight_absmax(ctx, group)
        if alpha_cfg != "auto":
            ctx.choices.setdefault(group.name, {})["alpha"] = alpha_cfg
            apply_smoothing(ctx, group, smoothquant_scale(stats.absmax, w_absmax, alpha_cfg))
            continue
        x = stats.sample_matrix()
        weights = [lin.weight.detach() for lin in ctx.group_linears(group)]
        schemes = [ctx.search_scheme(n) for n in group.linears]
        device = weights[0].device
        scale = {a: smoothquant_scale(stats.absmax, w_absmax, a).to(device) for a in ALPHA_GRID}
        loss = GroupQuantLoss(x, weights, schemes)
        losses = {a: loss(scale[a]) for a in ALPHA_GRID}
        errors = {a: ctx.block_error(lambda c, s=scale[a], g=group: apply_smoothing(c, g, s))
                  for a in shortlisted(losses, ctx.params.shortlist)}
        best = min(errors, key=errors.get)
        choice = {"block_error_identity": current, "loss_identity": loss(), "gain_t": recorded_t(errors[best], current)}
        if accepts(errors[best], current, ctx.params.min_gain, ctx.params.min_t):
            apply_smoothing(ctx, group, scale[best])
            current = errors[best]
            choice.update(alpha=best, loss=losses[best])
        else:
            choice.update(alpha=None, loss=choice["loss_identity"])
        ctx.choices.setdefault(group.name, {}).update(choice, block_error=current)
