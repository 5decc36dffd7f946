"""GPTQ for symmetric weights at any granularity of their scheme, on every quantized target linear of a block.

Hessian H = X^T X / n from the captured inputs of the linear's input group (after any smoothing),
damping ``damp * mean(diag H)``, columns processed in lazy batches of ``block_size`` with the
Cholesky factor of H^-1, optional act-order (columns by decreasing diag H). Scales are fixed up front
from the weight, as the scheme chooses them (static groups); the codes absorb the error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.schema import bounded
from ..quant.scheme import TensorScheme, scales_of
from .registry import BlockContext, register_step


@dataclass
class GPTQParams:
    damp: float = bounded(0.01, 0.0, 1.0, exclusive_low=True)
    block_size: int = bounded(128, 1, None)
    act_order: bool = False



@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, ts: TensorScheme, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codes fp32 [out, in], scales fp32 as ``ts`` lays them out) for weight ``w`` given input
    Hessian ``hessian``. The scales are chosen up front from the weight (static groups); column j is
    rounded with the scale of the block that holds it."""
    w = w.detach().float().clone()
    h = hessian.detach().float().clone().to(w.device)
    scale = scales_of(w, ts)
    rows, cols = ts.block_size(tuple(w.shape))
    col_scale = scale.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)  # [out, in]
    grid = ts.grid_
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
            col = w1[:, i]
            sc = col_scale[:, i1 + i]
            q = grid.codes(col, sc)
            codes[:, i1 + i] = q
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
                lin.weight, h, scheme.weight, ctx.params.damp, ctx.params.block_size, ctx.params.act_order)
            ctx.choices.setdefault(local, {})["method"] = "gptq"
