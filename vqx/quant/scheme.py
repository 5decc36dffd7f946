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
``e4m3`` with a global scale (NVFP4, lightx2v's ``ref_nvfp4_quant`` code for code, see `_nvfp4_scales`);
``e8m0`` (microscaling: a power of two per block, chosen by ``e8m0_rule``, see `_e8m0`).

Where a reference rounds in a way of its own, vqx follows it and says so at the spot:
- NVFP4 (lightx2v_kernel/test/nvfp4_nvfp4/fake_quant.py, the kernel scaled_nvfp4_quant_sm120): the global scale
  is a *multiplier* ``G = 2688 / amax`` computed in bf16 (the converter divides a bf16 tensor; the loader casts it
  to bf16 again); group scale ``s = G * (vec_max * fp32(1/6))`` cast to e4m3; codes ``e2m1(clamp(x * (G * (1/s))))``
  (a multiply by a rounded reciprocal, not a division); a group whose e4m3 scale underflows to 0 gets codes 0.
- MX (lightx2v_kernel/csrc/gemm/mxfp{4,6,8}_quant_kernels_sm120.cu): the block scale is ``amax / qmax`` rounded
  *up* to a power of two (``__nv_cvt_float_to_e8m0(.., cudaRoundPosInf)``), so block maxima never saturate; OCP MX
  v1.0's rule (``2^(floor(log2 amax) - emax_elem)``, which can saturate the block max) is ``e8m0_rule=floor``.
- ``amax_floor``: a reference that clamps the block absmax from below (sglang's per-token-group fp8 quantizer,
  eps 1e-10; deepgemm's per-block weight cast, 1e-4) instead of giving all-zero blocks scale 1.

A granularity whose group or block is larger than the tensor covers the whole dimension (a 128-group on a
64-wide toy layer is one group per row); a group that does not divide the dimension is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .numbers import FP8_E4M3_MAX, NumberGrid, div_exact, get_grid, scale_from_absmax

WEIGHT_GRANULARITIES = ("tensor", "channel", "group", "block")
ACTIVATION_GRANULARITIES = ("tensor", "token", "token_group")
SCALE_DTYPES = ("fp32", "bf16", "e4m3", "e8m0")
E8M0_RULES = ("ceil", "floor")  # lightx2v's MX kernels; OCP MX v1.0 section 6.3
E8M0_MIN_EXP = -127  # OCP MX: e8m0 encodes 2^-127 .. 2^127 (and NaN)
E8M0_MAX_EXP = 127
NVFP4_GLOBAL_AMAX = 6.0 * FP8_E4M3_MAX  # 2688: lightx2v's global scale is 2688 / amax


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
    global_scale: bool = False  # a second-level per-tensor scale (NVFP4); for activations a calibrated one
    e8m0_rule: str = "ceil"  # e8m0 scales: "ceil" (lightx2v's MX kernels) or "floor" (OCP MX v1.0)
    amax_floor: float = 0.0  # block absmax clamped from below (0: all-zero blocks get scale 1)

    def __post_init__(self):
        get_grid(self.grid)
        _choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        _choice("e8m0_rule", self.e8m0_rule, E8M0_RULES)
        if not (isinstance(self.amax_floor, (int, float)) and self.amax_floor >= 0):
            raise ValueError(f"amax_floor={self.amax_floor!r} is not valid; it must be a number >= 0")
        _choice("granularity", self.granularity, (*WEIGHT_GRANULARITIES, *ACTIVATION_GRANULARITIES))
        if self.granularity in ("group", "token_group") and not (self.group_size and self.group_size > 0):
            raise ValueError(f"granularity {self.granularity} needs a positive group_size, got {self.group_size!r}")
        if self.granularity == "block" and not (self.block and len(self.block) == 2 and min(self.block) > 0):
            raise ValueError(f"granularity block needs block=(rows, cols), got {self.block!r}")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError(f"a static scale is per tensor, not per {self.granularity}")
        if self.global_scale and self.scale_dtype != "e4m3":
            raise ValueError("a global scale goes with e4m3 group scales (NVFP4)")
        if self.scale_dtype == "e4m3" and not self.global_scale:
            raise ValueError("e4m3 group scales need global_scale=true (NVFP4: the global scale puts them in e4m3's range)")

    @property
    def grid_(self) -> NumberGrid:
        return get_grid(self.grid)

    @property
    def calibrated(self) -> bool:
        """Whether an activation scheme needs a calibrated per-tensor value: its static scale, or (NVFP4) the
        global scale of its dynamic group scales."""
        return not self.dynamic or self.global_scale

    def block_size(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Elements sharing one scale, as (rows, cols) of a 2-D tensor of ``shape``; checks divisibility. A group
        or block larger than the tensor covers the whole dimension."""
        rows, cols = shape
        g = self.granularity
        size = {"tensor": (rows, cols), "channel": (1, cols), "token": (1, cols),
                "group": (1, self.group_size), "token_group": (1, self.group_size),
                "block": self.block}[g]
        size = (min(size[0], rows) or 1, min(size[1], cols) or 1)
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
        scale = self.scale_dtype + (" + bf16 global" if self.global_scale else "")
        if self.scale_dtype == "e8m0":
            scale += f" {self.e8m0_rule}"
        if self.amax_floor:
            scale += f", absmax >= {self.amax_floor:g}"
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


def _over_qmax(amax: torch.Tensor, grid: NumberGrid) -> torch.Tensor:
    """``amax / qmax`` as lightx2v's kernels compute it: E2M1 kernels multiply by the fp32 constant
    0.16666666666666666f (nvfp4/mxfp4: ``vecMax * 0.16666666666666666f``), the others divide (``vecMax / 448.0f``,
    ``vecMax / 28.0f``)."""
    if grid.name == "fp4_e2m1":
        return amax * torch.tensor(1.0 / 6.0, dtype=torch.float32, device=amax.device)
    return div_exact(amax, grid.qmax)


def _exp2_int(exp: torch.Tensor) -> torch.Tensor:
    """2^exp for integer exp in [-127, 127], exact on every device, written as fp32 bits: CUDA's exp2 misses the
    subnormal power (2^-127 comes out as 5.8774704e-39, not 5.8774718e-39), which is e8m0's code 0."""
    e = exp.to(torch.int32)
    bits = torch.where(e >= -126, (e + 127) << 23, torch.full_like(e, 0x00400000))
    return bits.view(torch.float32)


def _e8m0(amax: torch.Tensor, grid: NumberGrid, rule: str) -> torch.Tensor:
    """A power of two per block, in e8m0's range [2^-127, 2^127]; NaN for a non-finite block.

    ``ceil`` (lightx2v's mxfp4/6/8 quant kernels): ``__nv_cvt_float_to_e8m0(amax / qmax, satfinite, RoundPosInf)``,
    the smallest power of two >= amax / qmax, so no element of the block saturates; 0 gives 2^-127 (e8m0's code 0).
    ``floor`` (OCP MX v1.0 section 6.3): ``2^(floor(log2(amax)) - emax_elem)``; the block max can then exceed the
    element grid and saturates (MXFP4 absmax 7.9: scale 1, 7.9 -> 6). The exponents come from frexp (exact, also
    for subnormals); log2 in fp32 rounds just below a power of two up to it."""
    emax = math.floor(math.log2(grid.qmax))
    if rule == "ceil":
        mant, exp = torch.frexp(_over_qmax(amax, grid))  # value = mant * 2^exp, mant in [0.5, 1)
        exp = torch.where(mant == 0.5, exp - 1, exp)  # an exact power of two stays; anything above rounds up
        zero = _over_qmax(amax, grid) == 0
    else:
        mant, exp = torch.frexp(amax)
        exp = exp - 1 - emax
        zero = amax == 0
    exp = torch.where(zero, torch.full_like(exp, E8M0_MIN_EXP), exp).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    scale = _exp2_int(exp)
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """lightx2v's NVFP4 global scale of a tensor (or calibrated activation) absmax, ``2688.0 / amax`` as its
    converter computes it on a bf16 tensor (tools/convert/quant/quant.py: ``2688.0 / torch.max(torch.abs(w))``) and
    its loader after casting the stored ``input_absmax`` to bf16. That expression is bf16 arithmetic, and PyTorch
    evaluates ``number / tensor`` as ``tensor.reciprocal() * number``: 1/amax is rounded to bf16, then the product
    again (not one correctly rounded quotient: amax 3.4375 gives 784, not 780). vqx does the same so the stored
    value is the one lightx2v uses. An all-zero tensor gets 1.0 (the reference would divide by zero). fp32 scalar."""
    amax = amax.detach().float().to(torch.bfloat16)
    g = (torch.reciprocal(amax) * NVFP4_GLOBAL_AMAX).float()  # bf16 reciprocal, bf16 product, as `2688.0 / amax`
    return torch.where(amax == 0, torch.ones_like(g), g)


def global_scale_of(x: torch.Tensor, ts: TensorScheme) -> torch.Tensor:
    """The tensor's own NVFP4 global scale (`nvfp4_global_scale` of its absmax), fp32 scalar."""
    return nvfp4_global_scale(x.detach().float().abs().amax())


def _e4m3_group_scales(amax: torch.Tensor, grid: NumberGrid, g: torch.Tensor) -> torch.Tensor:
    """NVFP4 group scales in e4m3 (fp32 values), ``ref_nvfp4_quant``'s ``scale``: ``global_scale * (vec_max *
    get_reciprocal(6.0))`` cast to e4m3. The cast saturates at 448 as the kernel's ``__nv_fp8_e4m3(SFValue)`` does
    (satfinite; the reference's plain ``.to(float8_e4m3fn)`` gives NaN at 464 and above, which only a calibrated
    activation global scale smaller than the tensor's can reach)."""
    s = g * _over_qmax(amax, grid)
    return torch.clamp(s, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def _nvfp4_encode(x: torch.Tensor, s8: torch.Tensor, g: torch.Tensor, grid: NumberGrid) -> torch.Tensor:
    """``ref_nvfp4_quant``'s codes: ``output_scale = global_scale * get_reciprocal(scale)`` (1/s in fp32, 0 where
    the e4m3 scale is 0; the kernel uses rcp.approx, the reference an exact reciprocal: vqx follows the reference),
    then ``cast_to_fp4(clamp(x * output_scale, -6, 6))`` (round half to even on the E2M1 grid)."""
    recip = torch.where(s8 == 0, torch.zeros_like(s8), 1.0 / s8)
    out = g * recip
    return grid.round_to_grid(torch.clamp(x * out, -grid.qmax, grid.qmax))


def _effective(s8: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The dequantization scale of an e4m3 group scale under global scale g: s8 / g (the GEMM's alpha =
    1 / (g_a * g_w) applied to the e4m3 products). An e4m3 scale of 0 stays 0 (its codes are all 0)."""
    return s8 / g


def _recover_e4m3(scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The e4m3 group scales behind effective scales ``s8 / g``. Exact: s8 / g and its product with g are within
    2 fp32 ulps of s8, far inside e4m3's rounding interval (relative 2^-4), while s8 / g is a normal fp32 number
    (checked when the scales are chosen)."""
    return (scale * g).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def choose_scales(x: torch.Tensor, ts: TensorScheme, global_scale: torch.Tensor | None = None,
                  clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """fp32 scales [R/br, C/bc] of a 2-D tensor under ``ts``: codes x scale is the dequantized value.

    All-zero blocks get 1.0 (``amax_floor`` 0), e8m0's minimum 2^-127, or an e4m3 scale of 0 (NVFP4). With
    ``ts.global_scale`` the ``global_scale`` (NVFP4's multiplier G, see `nvfp4_global_scale`) is required and the
    returned scales are the effective ones, e4m3 scale / G. ``clip``: a multiplier of each block's absmax (a
    clipping search), a number or a tensor broadcastable to the scales."""
    grid = ts.grid_
    size = ts.block_size(tuple(x.shape))
    amax = _blocks(x.detach().float().abs(), size).amax(dim=(1, 3))
    if clip is not None:
        amax = amax * clip
    if ts.amax_floor:
        amax = amax.clamp(min=ts.amax_floor)
    if ts.scale_dtype == "e8m0":
        return _e8m0(amax, grid, ts.e8m0_rule)
    if ts.scale_dtype != "e4m3":
        return scale_from_absmax(amax, grid.qmax, round_to_bf16=ts.scale_dtype == "bf16")
    if global_scale is None:
        raise ValueError(f"{ts.describe()} needs a global scale")
    g = global_scale.detach().float().to(amax.device)
    eff = _effective(_e4m3_group_scales(amax, grid, g), g)
    tiny = (eff != 0) & (eff.abs() < torch.finfo(torch.float32).tiny)
    if bool(tiny.any()):
        raise ValueError(f"global scale {float(g):g} leaves NVFP4 effective scales below fp32's normal range "
                         "(an absmax under about 1e-30)")
    return eff


def quantize_with(x: torch.Tensor, ts: TensorScheme, scale: torch.Tensor,
                  global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 codes of a 2-D ``x`` on ``ts``'s grid with the given [R/br, C/bc] scales (NVFP4: effective scales
    and the global scale they were chosen with)."""
    size = ts.block_size(tuple(x.shape))
    return encode(_blocks(x.float(), size), ts, _expand(scale), global_scale).reshape(x.shape)


def encode(x: torch.Tensor, ts: TensorScheme, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 codes of ``x`` with scales broadcast to it (one element's scale each), as ``ts``'s reference computes
    them: ``round(x / scale)`` on the grid, or NVFP4's reciprocal-multiply order."""
    if ts.global_scale:
        if global_scale is None:
            raise ValueError(f"{ts.describe()} needs a global scale")
        g = global_scale.detach().float().to(x.device)
        return _nvfp4_encode(x.float(), _recover_e4m3(scale.float(), g), g, ts.grid_)
    return ts.grid_.round_to_grid(x.float() / scale)


def scales_of(x: torch.Tensor, ts: TensorScheme, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """`choose_scales` with the tensor's own global scale where the scheme has one."""
    return choose_scales(x, ts, global_scale_of(x, ts) if ts.global_scale else None, clip)


def quantize(x: torch.Tensor, ts: TensorScheme, global_scale: torch.Tensor | None = None,
             clip: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 codes [R, C], fp32 scales [R/br, C/bc]) of a 2-D tensor. NVFP4: ``global_scale`` defaults to the
    tensor's own."""
    if ts.global_scale and global_scale is None:
        global_scale = global_scale_of(x, ts)
    scale = choose_scales(x, ts, global_scale, clip)
    return quantize_with(x, ts, scale, global_scale), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, ts: TensorScheme) -> torch.Tensor:
    """fp32 values of 2-D codes and their [R/br, C/bc] scales."""
    size = ts.block_size(tuple(codes.shape))
    return (_blocks(codes.float(), size) * _expand(scale.float())).reshape(codes.shape)


def quantize_activation(x2: torch.Tensor, ts: TensorScheme, value: torch.Tensor | None = None):
    """(fp32 codes, fp32 scales) of activation rows x2 [M, K] under ``ts``. ``value``: a calibrated per-tensor value:
    the static scale of a static scheme, or the global scale of an NVFP4-style scheme (without one, the tensor's own
    global scale: search losses on samples)."""
    x2 = x2.float()  # upcast once: the scales and the codes both read the fp32 values
    if ts.global_scale:
        g = global_scale_of(x2, ts) if value is None else value.float().reshape(())
        scale = choose_scales(x2, ts, g)
        return quantize_with(x2, ts, scale, g), scale
    scale = scales_of(x2, ts) if value is None else value.float().reshape(1, 1)
    return quantize_with(x2, ts, scale), scale


def fake_quantize(x: torch.Tensor, ts: TensorScheme, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize along the last dimension (any leading shape), fp32 math, result in ``x.dtype``.
    ``scale``: the calibrated per-tensor value of `quantize_activation`."""
    codes, scale = quantize_activation(x.reshape(-1, x.shape[-1]), ts, scale)
    return dequantize(codes, scale, ts).to(x.dtype).reshape(x.shape)
