"""Quantization schemes: how one tensor is put on a number grid, and one primitive that does it.

A `TensorScheme` says *what* (in the spirit of torchao's granularity objects): the grid, the
granularity (which elements share a scale), static or dynamic, the scale's dtype and an optional
second-level (global) scale. A `Scheme` pairs a weight scheme with an activation scheme. Every
granularity of a 2-D tensor [rows, cols] is a block size (torchao's ``block_size``):

    weights [out, in]       tensor (out, in)   channel (1, in)   group (1, g)   block (br, bc)
    activations [tok, in]   tensor (tok, in)   token (1, in)     token_group (1, g)

`quantize` returns fp32 codes [rows, cols] and fp32 scales [rows / br, cols / bc] (per channel that is
today's [out, 1]); `dequantize` expands the scales back. All math is fp32 whatever the input dtype.

Scale dtypes: ``fp32``; ``bf16`` (fp32 rounded to the nearest bf16, what lightx2v's loader reads back);
``e4m3`` (NVFP4's group scales: ``absmax / qmax`` divided by the global scale and cast to e4m3 with
saturation); ``e8m0`` (OCP MX v1.0: a power of two, ``2^(floor(log2(absmax)) - emax)`` where emax is the
element grid's largest exponent; absmax 0 gives 2^-127). Global scales (NVFP4): ``absmax(tensor) /
(qmax * 448)``, so that every group scale fits e4m3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .numbers import FP8_E4M3_MAX, NumberGrid, div_exact, get_grid, scale_from_absmax

WEIGHT_GRANULARITIES = ("tensor", "channel", "group", "block")
ACTIVATION_GRANULARITIES = ("tensor", "token", "token_group")
SCALE_DTYPES = ("fp32", "bf16", "e4m3", "e8m0")
E8M0_MIN_EXP = -127  # OCP MX: e8m0 encodes 2^-127 .. 2^127 (and NaN)


def _choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{what}={value!r} is not valid; valid: {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class TensorScheme:
    """How one tensor (a weight, or a linear's input) is quantized."""

    grid: str  # a `numbers.GRIDS` name: int8, int4, fp8_e4m3, fp4_e2m1, fp6_e3m2, fp6_e2m3, fp_e3m4, ...
    granularity: str  # weights: WEIGHT_GRANULARITIES; activations: ACTIVATION_GRANULARITIES
    group_size: int | None = None  # group / token_group: elements along the input dimension per scale
    block: tuple[int, int] | None = None  # block: (rows, cols) per scale
    dynamic: bool = True  # activations: scales computed per call (False: one calibrated static scale)
    scale_dtype: str = "fp32"
    global_scale: bool = False  # a second-level fp32 scale per tensor (NVFP4)

    def __post_init__(self):
        get_grid(self.grid)
        _choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        _choice("granularity", self.granularity, (*WEIGHT_GRANULARITIES, *ACTIVATION_GRANULARITIES))
        if self.granularity in ("group", "token_group") and not (self.group_size and self.group_size > 0):
            raise ValueError(f"granularity {self.granularity} needs a positive group_size, got {self.group_size!r}")
        if self.granularity == "block" and not (self.block and len(self.block) == 2 and min(self.block) > 0):
            raise ValueError(f"granularity block needs block=(rows, cols), got {self.block!r}")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError(f"a static scale is per tensor, not per {self.granularity}")
        if self.global_scale and self.scale_dtype != "e4m3":
            raise ValueError("a global scale goes with e4m3 group scales (NVFP4)")

    @property
    def grid_(self) -> NumberGrid:
        return get_grid(self.grid)

    def block_size(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Elements sharing one scale, as (rows, cols) of a 2-D tensor of ``shape``; checks divisibility."""
        rows, cols = shape
        g = self.granularity
        size = {"tensor": (rows, cols), "channel": (1, cols), "token": (1, cols),
                "group": (1, self.group_size), "token_group": (1, self.group_size),
                "block": self.block}[g]
        if rows % size[0] or cols % size[1]:
            raise ValueError(f"a [{rows}, {cols}] tensor does not split into {g} blocks of {size[0]} x {size[1]}")
        return size

    def describe(self) -> str:
        g = self.granularity
        if g in ("group", "token_group"):
            g = f"{g} {self.group_size}"
        elif g == "block":
            g = f"block {self.block[0]}x{self.block[1]}"
        extra = "" if self.dynamic else ", static"
        scale = self.scale_dtype + (" + fp32 global" if self.global_scale else "")
        return f"{self.grid} per {g}{extra} ({scale} scales)"


@dataclass(frozen=True)
class Scheme:
    """Weights and activations of one linear. ``activation`` None: weight-only (16-bit inputs)."""

    name: str
    weight: TensorScheme | None
    activation: TensorScheme | None
    description: str = ""

    def __post_init__(self):
        if self.weight is not None:
            _choice(f"scheme {self.name}: weight granularity", self.weight.granularity, WEIGHT_GRANULARITIES)
        if self.activation is not None:
            if self.weight is None:
                raise ValueError(f"scheme {self.name}: activations are quantized only with weights")
            _choice(f"scheme {self.name}: activation granularity", self.activation.granularity, ACTIVATION_GRANULARITIES)

    @property
    def quantizes(self) -> bool:
        return self.weight is not None

    @property
    def weight_grid(self) -> NumberGrid | None:
        return None if self.weight is None else self.weight.grid_

    @property
    def activation_grid(self) -> NumberGrid | None:
        return None if self.activation is None else self.activation.grid_


# ---- the primitive ----------------------------------------------------------------------------------

def _blocks(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    rows, cols = x.shape
    return x.reshape(rows // size[0], size[0], cols // size[1], size[1])


def _expand(scale: torch.Tensor) -> torch.Tensor:
    """[R/br, C/bc] scales broadcast over blocks: a [R/br, 1, C/bc, 1] view (pair it with `_blocks`)."""
    return scale[:, None, :, None]


def _e8m0(amax: torch.Tensor, grid: NumberGrid) -> torch.Tensor:
    """OCP MX v1.0 shared scale: 2^(floor(log2(amax)) - emax_elem), clamped to e8m0's range.

    The spec's exponent is floor(log2) of the block absmax, so a block's largest value can land above
    the element grid's max and saturates (e.g. MXFP4 absmax 7.9 -> scale 1, 7.9 -> 6). That is the spec's
    rounding, not a choice of ours."""
    emax = math.floor(math.log2(grid.qmax))
    exp = torch.floor(torch.log2(amax)) - emax
    exp = torch.where(amax == 0, torch.full_like(exp, E8M0_MIN_EXP), exp)
    return torch.exp2(exp.clamp(E8M0_MIN_EXP, 127))


def global_scale_of(x: torch.Tensor, ts: TensorScheme) -> torch.Tensor:
    """NVFP4's second-level scale: absmax(x) / (qmax * 448), 1.0 for an all-zero tensor (fp32 scalar)."""
    amax = x.detach().float().abs().amax()
    g = div_exact(amax, ts.grid_.qmax * FP8_E4M3_MAX)
    return torch.where(amax == 0, torch.ones_like(g), g)


def choose_scales(x: torch.Tensor, ts: TensorScheme, global_scale: torch.Tensor | None = None,
                  clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """fp32 scales [R/br, C/bc] of a 2-D tensor under ``ts`` (all-zero blocks get 1.0, or e8m0's minimum).

    ``global_scale``: required with ``ts.global_scale``; the returned scales then are the *effective* ones
    (e4m3 group scale x global). ``clip``: a multiplier of each block's absmax (a clipping search), a
    number or a tensor broadcastable to the scales."""
    grid = ts.grid_
    size = ts.block_size(tuple(x.shape))
    amax = _blocks(x.detach().float().abs(), size).amax(dim=(1, 3))
    if clip is not None:
        amax = amax * clip
    if ts.scale_dtype == "e8m0":
        return _e8m0(amax, grid)
    if ts.scale_dtype != "e4m3":
        return scale_from_absmax(amax, grid.qmax, round_to_bf16=ts.scale_dtype == "bf16")
    scale = div_exact(amax, grid.qmax)
    g = global_scale.float() if ts.global_scale else torch.ones((), device=scale.device)
    if ts.global_scale and global_scale is None:
        raise ValueError(f"{ts.describe()} needs a global scale")
    # e4m3 group scales saturate at 448; a group whose scale underflows e4m3 to 0 gets the global scale
    # (its codes are then 0 or tiny), so every effective scale stays positive.
    e4m3 = torch.clamp(scale / g, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    return torch.where((amax == 0) | (e4m3 == 0), g.expand_as(e4m3), e4m3 * g)


def quantize_with(x: torch.Tensor, ts: TensorScheme, scale: torch.Tensor) -> torch.Tensor:
    """fp32 codes of a 2-D ``x`` on ``ts``'s grid with the given [R/br, C/bc] scales."""
    size = ts.block_size(tuple(x.shape))
    codes = ts.grid_.round_to_grid(_blocks(x.float(), size) / _expand(scale))
    return codes.reshape(x.shape)


def scales_of(x: torch.Tensor, ts: TensorScheme, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """`choose_scales` with the tensor's own global scale where the scheme has one."""
    return choose_scales(x, ts, global_scale_of(x, ts) if ts.global_scale else None, clip)


def quantize(x: torch.Tensor, ts: TensorScheme, global_scale: torch.Tensor | None = None,
             clip: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 codes [R, C], fp32 scales [R/br, C/bc]) of a 2-D tensor."""
    scale = choose_scales(x, ts, global_scale, clip)
    return quantize_with(x, ts, scale), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, ts: TensorScheme) -> torch.Tensor:
    """fp32 values of 2-D codes and their [R/br, C/bc] scales."""
    size = ts.block_size(tuple(codes.shape))
    return (_blocks(codes.float(), size) * _expand(scale.float())).reshape(codes.shape)


def fake_quantize(x: torch.Tensor, ts: TensorScheme, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize along the last dimension (any leading shape), fp32 math, result in ``x.dtype``.
    ``scale``: the calibrated scale of a static scheme (per tensor), else chosen from ``x``."""
    x2 = x.reshape(-1, x.shape[-1])
    if scale is None:
        scale = scales_of(x2, ts)
        codes = quantize_with(x2, ts, scale)
    else:
        scale = scale.float().reshape(1, 1)
        codes = quantize_with(x2, ts, scale)
    return dequantize(codes, scale, ts).to(x.dtype).reshape(x.shape)
