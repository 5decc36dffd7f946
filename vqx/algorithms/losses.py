"""Search losses: a group's output error after quantizing it, on calibration samples (fp32)."""

from __future__ import annotations

import torch

from ..quant.linear import quantize_weight
from ..quant.scheme import Scheme, dequantize, fake_quantize


@torch.no_grad()
def group_quant_loss(x: torch.Tensor, weights: list[torch.Tensor], schemes: Scheme | list[Scheme],
                     s: torch.Tensor | None = None, chunk: int = 4096) -> float:
    """sum over linears ||Q(x/s) Q(W s)^T - x W^T||^2 / ||x W^T||^2 over all sample tokens.

    ``x``: [n, in] fp32 samples of the group's current input; ``weights``: the group's current float
    weights, each quantized under its own scheme in ``schemes`` (or all under one); ``s``: a candidate smoothing factor
    (None: as is).
    """
    device = weights[0].device
    x = x.to(device)
    if isinstance(schemes, Scheme):
        schemes = [schemes] * len(weights)
    num, den = 0.0, 0.0
    wq = []
    for w, scheme in zip(weights, schemes, strict=True):
        w = w.float()
        ws = w if s is None else w * s[None, :]
        codes, scale = quantize_weight(ws, scheme.weight)
        wq.append((w, dequantize(codes, scale, scheme.weight), scheme.activation))
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]
        xs = xb if s is None else xb / s[None, :]
        quantized = {}  # activation scheme -> Q(xs): linears of one scheme share it
        for w, wdq, act in wq:
            if act not in quantized:
                quantized[act] = xs if act is None else fake_quantize(xs, act)
            ref = xb @ w.T
            num += float(((quantized[act] @ wdq.T) - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / den if den > 0 else num
