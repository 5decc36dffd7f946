"""Search losses: a group's output error after quantizing it, on calibration samples (fp32)."""

from __future__ import annotations

import torch

from ..quant.linear import quantize_weight
from ..quant.scheme import Scheme, dequantize, fake_quantize


# The unquantized outputs x W^T of a group's sample are kept between candidates up to this size (fp32 bytes): at
# wan_mini and at Wan2.1's attention groups all of them; a 14B FFN input (40,960 sampled tokens x 13,824) recomputes.
REFERENCE_CACHE_BYTES = 1 << 30


class GroupQuantLoss:
    """`group_quant_loss` of one group for many candidate factors ``s``: the unquantized outputs x W^T and their
    squared norm are computed once (within `REFERENCE_CACHE_BYTES`), not once per candidate. The numbers are the
    ones `group_quant_loss` gives, bit for bit: the same chunks, summed in the same order."""

    def __init__(self, x: torch.Tensor, weights: list[torch.Tensor], schemes: Scheme | list[Scheme],
                 chunk: int = 4096, cache: bool = True):
        self.weights = [w.float() for w in weights]
        self.schemes = [schemes] * len(weights) if isinstance(schemes, Scheme) else list(schemes)
        self.x = x.to(self.weights[0].device)
        self.chunk = chunk
        out_total = sum(w.shape[0] for w in self.weights)
        self.cache = cache and self.x.shape[0] * out_total * 4 <= REFERENCE_CACHE_BYTES
        self._refs: dict[tuple[int, int], torch.Tensor] = {}
        self._den: float | None = None

    def _reference(self, start: int, i: int, xb: torch.Tensor) -> torch.Tensor:
        ref = self._refs.get((start, i))
        if ref is None:
            ref = xb @ self.weights[i].T
            if self.cache:
                self._refs[(start, i)] = ref
        return ref

    @torch.no_grad()
    def __call__(self, s: torch.Tensor | None = None) -> float:
        """sum over linears ||Q(x/s) Q(W s)^T - x W^T||^2 / ||x W^T||^2 (s None: as is)."""
        wq = []
        for w, scheme in zip(self.weights, self.schemes, strict=True):
            ws = w if s is None else w * s[None, :]
            codes, scale = quantize_weight(ws, scheme.weight)
            wq.append((dequantize(codes, scale, scheme.weight), scheme.activation))
        num, den = 0.0, 0.0
        for start in range(0, self.x.shape[0], self.chunk):
            xb = self.x[start:start + self.chunk]
            xs = xb if s is None else xb / s[None, :]
            quantized = {}  # activation scheme -> Q(xs): linears of one scheme share it
            for i, (wdq, act) in enumerate(wq):
                if act not in quantized:
                    quantized[act] = xs if act is None else fake_quantize(xs, act)
                ref = self._reference(start, i, xb)
                num += float(((quantized[act] @ wdq.T) - ref).pow(2).sum())
                if self._den is None:
                    den += float(ref.pow(2).sum())
        if self._den is None:
            self._den = den
        den = self._den
        return num / den if den > 0 else num


@torch.no_grad()
def group_quant_loss(x: torch.Tensor, weights: list[torch.Tensor], schemes: Scheme | list[Scheme],
                     s: torch.Tensor | None = None, chunk: int = 4096) -> float:
    """sum over linears ||Q(x/s) Q(W s)^T - x W^T||^2 / ||x W^T||^2 over all sample tokens.

    ``x``: [n, in] fp32 samples of the group's current input; ``weights``: the group's current float
    weights, each quantized under its own scheme in ``schemes`` (or all under one); ``s``: a candidate smoothing factor
    (None: as is). Many candidates of one group: `GroupQuantLoss`.
    """
    return GroupQuantLoss(x, weights, schemes, chunk, cache=False)(s)  # one candidate: nothing to keep
