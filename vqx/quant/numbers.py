"""Number grids a tensor is quantized onto, and the pure fp32 quantizer math.

Conventions (the same ones lightx2v runs, ../docs in the README):
- symmetric absmax scaling: ``scale = absmax / qmax`` along the reduced dimension;
- int8: ``codes = clamp(round_half_even(x / scale), -128, 127)``;
- fp8 e4m3: ``codes = clamp(x / scale, -448, 448).to(torch.float8_e4m3fn)`` (round to nearest even);
- all-zero rows/tokens get scale 1.0 and codes 0, so every scale is positive and finite;
- non-finite values are never turned into finite codes: a NaN or Inf in a row makes every code of that
  row NaN (an Inf absmax gives an Inf scale), so the fault stays visible downstream. Storage dtypes
  without NaN (int8) refuse non-finite input (`check_finite`).

All arithmetic here is fp32 whatever the caller's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclass(frozen=True)
class NumberGrid:
    """A symmetric grid of representable codes: ``qmax`` is its largest magnitude."""

    name: str
    qmax: float
    round_to_grid: Callable[[torch.Tensor], torch.Tensor]  # fp32 in, fp32 codes out
    storage_dtype: torch.dtype | None  # dtype codes are stored in (export); None: research grid
    bits: int
    minifloat: tuple[int, int] | None = None  # (exp_bits, man_bits) of a `minifloat_round` grid

    def codes(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """fp32 codes of ``x / scale`` on this grid."""
        return self.round_to_grid(x.float() / scale)

    def to_storage(self, codes: torch.Tensor) -> torch.Tensor:
        if self.storage_dtype is None:
            raise ValueError(f"grid {self.name} has no storage dtype (fake-quant only)")
        return codes.to(self.storage_dtype)


def _round_int8(x: torch.Tensor) -> torch.Tensor:
    # torch.round is round-half-to-even; clamp keeps NaN as NaN.
    return torch.clamp(torch.round(x), -128.0, 127.0)


def _round_int4(x: torch.Tensor) -> torch.Tensor:
    # Symmetric int4 (codes -8..7, scales from qmax 7); stored as int8 codes, packed two per byte by exporters.
    return torch.clamp(torch.round(x), -8.0, 7.0)


def _round_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    # float8_e4m3fn has no Inf; what an unclamped cast does above 448 differs across torch versions and
    # devices (saturate or NaN), so saturation is explicit.
    return torch.clamp(x, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def minifloat_round(x: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """Round fp32 ``x`` to a sign/exp_bits/man_bits float with IEEE-style bias, subnormals, no Inf/NaN
    codes (every exponent is finite), saturating at the largest finite value. Round half to even.

    Research formats (fp_e3m4, fp_e2m5) are fake-quant only. We do not route e4m3 through qtorch (LLMC
    does): qtorch's e4m3 saturates at 480 instead of OCP e4m3fn's 448 and turns NaN into 480, so it
    disagrees with every fp8 kernel; vqx's e4m3 is torch.float8_e4m3fn.
    """
    bias = 2 ** (exp_bits - 1) - 1
    min_exp = 1 - bias  # smallest normal exponent; below it the spacing stays fixed (subnormals)
    max_val = (2.0 - 2.0 ** (-man_bits)) * 2.0 ** ((2**exp_bits - 1) - bias)
    x = x.float()
    mag = x.abs()
    exp = torch.floor(torch.log2(mag.clamp_min(torch.finfo(torch.float32).tiny)))
    exp = torch.clamp(exp, min=min_exp)
    step = torch.exp2(exp - man_bits)
    rounded = torch.round(x / step) * step
    return torch.clamp(rounded, -max_val, max_val)


def minifloat_max(exp_bits: int, man_bits: int) -> float:
    bias = 2 ** (exp_bits - 1) - 1
    return (2.0 - 2.0 ** (-man_bits)) * 2.0 ** ((2**exp_bits - 1) - bias)


def _minifloat_grid(exp_bits: int, man_bits: int, name: str | None = None) -> NumberGrid:
    return NumberGrid(
        name=name or f"fp_e{exp_bits}m{man_bits}",
        qmax=minifloat_max(exp_bits, man_bits),
        round_to_grid=lambda x: minifloat_round(x, exp_bits, man_bits),
        storage_dtype=None,
        bits=1 + exp_bits + man_bits,
        minifloat=(exp_bits, man_bits),
    )


GRIDS: dict[str, NumberGrid] = {
    "int8": NumberGrid("int8", 127.0, _round_int8, torch.int8, 8),
    "fp8_e4m3": NumberGrid("fp8_e4m3", FP8_E4M3_MAX, _round_fp8_e4m3, torch.float8_e4m3fn, 8),
    "int4": NumberGrid("int4", 7.0, _round_int4, torch.int8, 4),
    # OCP MX element grids (no Inf/NaN codes): FP4 E2M1 (max 6), FP6 E3M2 (max 28), FP6 E2M3 (max 7.5).
    "fp4_e2m1": _minifloat_grid(2, 1, "fp4_e2m1"),
    "fp6_e3m2": _minifloat_grid(3, 2, "fp6_e3m2"),
    "fp6_e2m3": _minifloat_grid(2, 3, "fp6_e2m3"),
    "fp_e3m4": _minifloat_grid(3, 4),
    "fp_e2m5": _minifloat_grid(2, 5),
}


def get_grid(name: str) -> NumberGrid:
    try:
        return GRIDS[name]
    except KeyError:
        raise ValueError(f"unknown number grid {name!r}; valid: {', '.join(GRIDS)}") from None


def div_exact(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device. PyTorch's CUDA division by a Python number
    multiplies by its reciprocal (off by one ulp for some x; CPU divides), so divide by a tensor."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def absmax_scale(x: torch.Tensor, dim: int, qmax: float, round_to_bf16: bool = False) -> torch.Tensor:
    """Symmetric scale ``absmax / qmax`` along ``dim`` (kept), fp32. All-zero slices get 1.0.

    ``round_to_bf16``: round the scale to the nearest bf16 value (lightx2v's loader casts scales through
    bf16, so an exported scale must already be bf16-representable; quantize with the rounded scale).
    """
    return scale_from_absmax(x.detach().float().abs().amax(dim=dim, keepdim=True), qmax, round_to_bf16)


def scale_from_absmax(amax: torch.Tensor, qmax: float, round_to_bf16: bool = False) -> torch.Tensor:
    """``amax / qmax`` (fp32, correctly rounded), optionally rounded to bf16; all-zero slices get 1.0."""
    scale = div_exact(amax, qmax)
    if round_to_bf16:
        scale = scale.to(torch.bfloat16).float()
    # Only exact zeros are replaced; NaN/Inf propagate (see module doc).
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize(x: torch.Tensor, grid: NumberGrid, dim: int, round_scale_to_bf16: bool = False):
    """Per-slice symmetric quantization. Returns (fp32 codes, fp32 scale with ``dim`` kept)."""
    scale = absmax_scale(x, dim, grid.qmax, round_scale_to_bf16)
    return grid.codes(x, scale), scale


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        kind = "NaN" if torch.isnan(t).any() else "Inf"
        raise ValueError(f"{what} has {bad} non-finite ({kind}) values")
