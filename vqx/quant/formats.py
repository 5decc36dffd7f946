"""Quantization formats: which grid weights and activations use, at which granularity.

Weights: per output channel, symmetric, absmax. Activations: per token, dynamic, symmetric.
A format is data; the math lives in `numbers.py` and the modules in `linear.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .numbers import NumberGrid, get_grid


@dataclass(frozen=True)
class QuantFormat:
    name: str
    weight: str | None  # grid name, None: weights stay float
    activation: str | None  # grid name, None: activations stay float (weight-only)
    lightx2v_scheme: str | None  # "int8" / "fp8": the family of lightx2v schemes that load it; None: not exportable
    description: str

    @property
    def quantizes(self) -> bool:
        return self.weight is not None

    @property
    def weight_grid(self) -> NumberGrid | None:
        return get_grid(self.weight) if self.weight else None

    @property
    def activation_grid(self) -> NumberGrid | None:
        return get_grid(self.activation) if self.activation else None


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in [
        QuantFormat("none", None, None, None, "no quantization (checks that transforms preserve the model)"),
        QuantFormat("w8a8", "int8", "int8", "int8", "int8 weights per channel, int8 activations per token"),
        QuantFormat("fp8", "fp8_e4m3", "fp8_e4m3", "fp8", "fp8 e4m3 weights per channel, fp8 e4m3 activations per token"),
        QuantFormat("w8a16", "int8", None, None, "int8 weights per channel, 16-bit activations (weight-only)"),
        QuantFormat("fp8_w", "fp8_e4m3", None, None, "fp8 e4m3 weights per channel, 16-bit activations (weight-only)"),
        QuantFormat("fp_e3m4", "fp_e3m4", "fp_e3m4", None, "research 8-bit float e3m4, weights and activations (fake-quant only)"),
        QuantFormat("fp_e2m5", "fp_e2m5", "fp_e2m5", None, "research 8-bit float e2m5, weights and activations (fake-quant only)"),
    ]
}


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; valid: {', '.join(FORMATS)}") from None
