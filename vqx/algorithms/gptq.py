"""GPTQ for symmetric weights at any granularity of their scheme, on every quantized target linear of a block.

Hessian H = X^T X / n from the captured inputs of the linear's input group (after any smoothing),
damping ``damp * mean(diag H)``, columns processed in lazy batches of ``block_size`` with the
Cholesky factor of H^-1, optional act-order (columns by decreasing diag H).

Scales: per output channel or tensor they are fixed up front from the weight. Column groups (``group``, 2-D
``block``: NVFP4, MX, int4 g128, fp8 b128) get theirs as the column sweep reaches each group, from the group's
weights as the error feedback has left them (GPTQ's own grouping), unless ``static_groups`` fixes every group's
scale up front from the original weight. A global scale (NVFP4) is always the original weight's. Act-order with
column groups needs static groups (the groups stay contiguous in the original column order, as every kernel
reads them).
"""

from __future__ import annotations

import torch

from ..quant.scheme import TensorScheme, choose_scales, encode, global_scale_of
from .params import GPTQParams, act_order_refusal
from .registry import BlockContext, register_step


def has_column_groups(ts: TensorScheme, shape: tuple[int, int]) -> bool:
    """Whether ``ts`` splits a weight's input columns into several scale groups."""
    return ts.block_size(shape)[1] < shape[1]


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, ts: TensorScheme, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codes fp32 [out, in], scales fp32 as ``ts`` lays them out) for weight ``w`` given input
    Hessian ``hessian``. Column j is rounded with the scale of the block that holds it: fixed up front, or
    (column groups, not ``static_groups``) chosen when the sweep reaches the group's first column."""
    w = w.detach().float().clone()
    h = hessian.detach().float().clone().to(w.device)
    g = global_scale_of(w, ts) if ts.global_scale else None  # NVFP4: from the original weight, as QuantLinear's
    rows, cols = ts.block_size(tuple(w.shape))
    dynamic = not static_groups and has_column_groups(ts, tuple(w.shape))
    if dynamic and act_order:
        raise ValueError(act_order_refusal(act_order, static_groups))
    if dynamic:
        scale = torch.zeros(w.shape[0] // rows, w.shape[1] // cols, device=w.device)
        col_scale = torch.zeros_like(w)
    else:
        scale = choose_scales(w, ts, g)
        col_scale = scale.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)  # [out, in]
    n = w.shape[1]
    dead = torch.diag(h) == 0  # channels never active: no information, quantize as is
    h[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h, col_scale = w[:, perm], h[perm][:, perm], col_scale[:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError("Hessian is not positive definite even after damping; increase algorithm.damp") from None
    codes = torch.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % cols == 0:
                # The group's weights as the feedback left them: its columns in this lazy batch are current in w1;
                # those past the batch still lack the batch's updates so far, added here.
                grp = w1[:, i:i + cols]
                if j + cols > i2:
                    rest = w[:, i2:j + cols] - err1[:, :i] @ hinv[i1:j, i2:j + cols]
                    grp = torch.cat([grp, rest], dim=1)
                s = choose_scales(grp, ts, g)  # [out / rows, 1]
                scale[:, j // cols] = s[:, 0]
                col_scale[:, j:j + cols] = s.repeat_interleave(rows, dim=0)
            col = w1[:, i]
            sc = col_scale[:, j]
            q = encode(col, ts, sc, g)
            codes[:, j] = q
            err = (col - q * sc) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale


@register_step("gptq", params=GPTQParams, needs=frozenset({"hessian"}))
def gptq(ctx: BlockContext) -> None:
    for group in ctx.groups:
        stats = ctx.stats[group.name]
        h = None
        for local in group.linears:
            scheme = ctx.schemes.get(local)
            if local not in ctx.targets or scheme is None:
                continue  # GPTQ is a choice of codes: nothing to choose for a layer kept float
            h = stats.normalized_hessian() if h is None else h
            lin = ctx.block.get_submodule(local)
            ctx.chosen_codes[ctx.full_name(local)] = gptq_quantize(
                lin.weight, h, scheme.weight, ctx.params.damp, ctx.params.block_size, ctx.params.act_order,
                ctx.params.static_groups)
            ctx.choices.setdefault(local, {})["method"] = "gptq"
