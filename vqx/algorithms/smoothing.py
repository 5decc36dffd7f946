"""Placing a smoothing factor s of an input group (shared by SmoothQuant and AWQ).

The group's input is divided by s and the weight columns of its linears are multiplied by s, so the
float model is unchanged. Where 1/s goes depends on the group's fold kind (`models.adapter.InputGroup`;
the model adapter names the place):
- runtime: a per-block vector the quantized linears apply at run time (Wan: lightx2v's affine_norm1/3);
- norm: the affine norm before the group, its weight and bias (exact fold; Wan: the cross-attention norm2);
- v_rows: the rows (and bias) of the value projection(s) whose attention output feeds the group (exact:
  attention mixes value rows linearly; the model normalizes only q and k).
All arithmetic in fp32, written back in each tensor's dtype.
"""

from __future__ import annotations

import torch

from ..models.adapter import InputGroup
from .registry import BlockContext


def smoothable(group: InputGroup, only: list[str] | None = None) -> bool:
    """Whether a step may smooth ``group``: it has a place for the factor, and it is among ``only`` (a step's
    ``groups`` parameter; None: every such group)."""
    return group.kind is not None and (only is None or group.name in only)


@torch.no_grad()
def _scale_(t: torch.Tensor, factor: torch.Tensor) -> None:
    t.copy_((t.float() * factor).to(t.dtype))


@torch.no_grad()
def apply_smoothing(ctx: BlockContext, group: InputGroup, s: torch.Tensor) -> None:
    """Divide ``group``'s input by ``s`` (per input channel) and fold the factor where the group allows."""
    if group.kind is None:
        raise ValueError(f"group {group.name} has no place for a smoothing factor")
    s = s.float()
    for lin in ctx.group_linears(group):
        _scale_(lin.weight, s.to(lin.weight.device)[None, :])
    if group.kind == "runtime":
        prev = ctx.runtime_smoothing.get(group.fold)
        ctx.runtime_smoothing[group.fold] = s if prev is None else prev * s
    elif group.kind == "norm":
        norm = ctx.block.get_submodule(group.fold)
        if getattr(norm, "weight", None) is None:
            raise ValueError(f"block {ctx.index}: {group.fold} is not affine (e.g. Wan's cross_attn_norm=False); "
                             "cannot fold")
        _scale_(norm.weight, 1.0 / s.to(norm.weight.device))
        _scale_(norm.bias, 1.0 / s.to(norm.bias.device))
        _record_input_scale(ctx, group, s)
    elif group.kind == "v_rows":
        for src in group.fold_sources:
            lin = ctx.block.get_submodule(src)
            _scale_(lin.weight, 1.0 / s.to(lin.weight.device)[:, None])
            if lin.bias is not None:
                _scale_(lin.bias, 1.0 / s.to(lin.bias.device))
            ctx.output_scale[src] = ctx.output_scale.get(src, torch.ones_like(s)) * s
        _record_input_scale(ctx, group, s)
    else:
        raise ValueError(f"unknown fold kind {group.kind!r}")
    if group.name in ctx.stats:
        ctx.stats[group.name].scale_inputs(s)


def _record_input_scale(ctx: BlockContext, group: InputGroup, s: torch.Tensor) -> None:
    for name in group.linears:
        ctx.input_scale[name] = ctx.input_scale.get(name, torch.ones_like(s)) * s


def group_weight_absmax(ctx: BlockContext, group: InputGroup) -> torch.Tensor:
    """max over the group's linears and output rows of |W[:, j]|, per input channel j (fp32)."""
    return torch.stack([lin.weight.detach().float().abs().amax(dim=0) for lin in ctx.group_linears(group)]).amax(dim=0)


def clamp_scale(s: torch.Tensor) -> torch.Tensor:
    """Keep factors finite and positive (channels that never activate, or zero weight columns)."""
    s = torch.nan_to_num(s, nan=1.0, posinf=1.0, neginf=1.0)
    return s.clamp(min=1e-5, max=1e5)
