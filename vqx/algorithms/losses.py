"""Search losses: a group's output error after quantizing it, on calibration samples (fp32)."""

from __future__ import annotations

import torch

from ..quant.formats import QuantFormat
from ..quant.linear import fake_quantize_tokens, quantize_weight


@torch.no_grad()
def group_quant_loss(x: torch.Tensor, weights: list[torch.Tensor], fmt: QuantFormat,
                     s: torch.Tensor | None = None, chunk: int = 4096) -> float:
    """sum over linears ||Q(x/s) Q(W s)^T - x W^T||^2 / ||x W^T||^2 over all sample tokens.

    ``x``: [n, in] fp32 samples of the group's current input; ``weights``: the group's current float
    weights; ``s``: a candidate smoothing factor (None: as is).
    """
    device = weights[0].device
    x = x.to(device)
    num, den = 0.0, 0.0
    wq = []
    for w in weights:
        w = w.float()
        ws = w if s is None else w * s[None, :]
        codes, scale = quantize_weight(ws, fmt.weight_grid)
        wq.append((w, codes * scale))
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]
        xs = xb if s is None else xb / s[None, :]
        if fmt.activation_grid is not None:
            xs = fake_quantize_tokens(xs, fmt.activation_grid)
        for w, wdq in wq:
            ref = xb @ w.T
            num += float(((xs @ wdq.T) - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / den if den > 0 else num
