"""Triton kernels: per-token activation quantization fused with the elementwise op before it.

Each kernel reproduces, bit for bit, an eager twin in `fastpath.py` or, for a model's own elementwise ops, in
its family's ops module (vqx.models.wan.ops): the PyTorch op sequence diffusers and `QuantLinear` run, so
the kernels pin down every rounding instead of trusting defaults:
- divisions are IEEE (`tl.div_rn`; Triton's `/` is approximate); products and sums are separate IEEE
  operations (launched with enable_fp_fusion=False: never contracted into an FMA, which eager PyTorch
  does not do either), with subnormals kept (no libdevice *_rn calls, which Triton links with FTZ);
- int8 codes round half to even (`rint`); fp32 -> bf16 and fp32 -> float8_e4m3fn round to nearest even
  (the GPU's cvt.rn instructions);
- NaN/Inf follow the reference quantizer: a NaN in a row makes the row's scale NaN, clamps keep NaN.

This module imports triton; `fastpath.py` imports it only when a Triton path is used. Under
TRITON_INTERPRET=1 (the CPU tests) the libdevice calls and the float conversions, which the interpreter
lacks or rounds wrongly, are replaced by exact integer/tl arithmetic; tanh there is computed from exp
and is not CUDA's (the fused GELU is used only where it matches F.gelu on every bf16 input).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Exact integer versions of the conversions, for the interpreter.
@triton.jit
def _bf16_round_bits(f):
    """fp32 -> bf16 bits (uint32 < 2**16), round half to even; NaN -> 0x7FC0 (as c10::BFloat16)."""
    u = f.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)


@triton.jit
def _round_e4m3(y):
    """clamp(y, -448, 448) rounded half to even onto float8_e4m3fn (subnormals included), as fp32."""
    a = tl.abs(y)
    a = tl.where(a > 448.0, 448.0, a)  # NaN compares false and stays NaN
    e = ((a.to(tl.uint32, bitcast=True) >> 23).to(tl.int32)) - 127
    e = tl.maximum(e, -6)  # below 2**-6 the spacing stays 2**-9 (subnormals)
    inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2**(3 - e): exact power-of-two scaling
    step = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3)
    r = _mul(_rint(_mul(a, inv_step)), step)
    sign = (y.to(tl.uint32, bitcast=True) >> 31) << 31
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_bits(r):
    """Bits of float8_e4m3fn for an fp32 ``r`` that is exactly on the grid (NaN -> 0x7F with its sign)."""
    u = r.to(tl.uint32, bitcast=True)
    sign = ((u >> 31) << 7).to(tl.int32)
    a = u & 0x7FFFFFFF
    e = (a >> 23).to(tl.int32) - 127
    normal = ((e + 7) << 3) | ((a >> 20) & 7).to(tl.int32)
    sub = (a.to(tl.float32, bitcast=True) * 512.0).to(tl.int32)  # k * 2**-9, k < 8
    bits = tl.where(e >= -6, normal, sub)
    bits = tl.where(a > 0x7F800000, 0x7F, bits)
    return bits | sign


@triton.jit
def _nanmax(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


if INTERPRET:
    @triton.jit
    def _rint(x):
        # Round half to even for |x| < 2**22 (every quotient here is <= 128), keeping the sign of zero.
        a = tl.abs(x)
        r = (a + 12582912.0) - 12582912.0
        sign = (x.to(tl.uint32, bitcast=True) >> 31) << 31
        return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _mul(a, b):
        return a * b

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _sub(a, b):
        return a - b

    @triton.jit
    def _fma(a, b, c):
        return a * b + c

    @triton.jit
    def _tanh(x):
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _bf16(f):
        return (_bf16_round_bits(f) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_bf16(ptr, mask):  # mask None: every element (no predicate)
        if mask is None:
            b = tl.load(ptr).to(tl.uint16, bitcast=True).to(tl.uint32)
        else:
            b = tl.load(ptr, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (b << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _store_bf16(ptr, f, mask):
        tl.store(ptr, (f.to(tl.uint32, bitcast=True) >> 16).to(tl.int16), mask=mask)

    @triton.jit
    def _fp8_dequant(y):
        return _round_e4m3(y)

    @triton.jit
    def _fp8_codes(y):
        return _e4m3_bits(_round_e4m3(y)).to(tl.uint8)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _rint(x):
        return libdevice.rint(x)  # cvt.rni.f32.f32

    # Plain IEEE products and sums: the launches pass enable_fp_fusion=False, so they are never contracted
    # into FMAs (libdevice's mul_rn/add_rn would flush subnormals to zero: Triton links it with FTZ on).
    @triton.jit
    def _mul(a, b):
        return a * b

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _sub(a, b):  # not _add(a, -b): Triton negates as 0 - b, which turns -0 - (+0) into +0
        return a - b

    @triton.jit
    def _fma(a, b, c):
        return tl.fma(a, b, c)  # fma.rn.f32, no FTZ

    @triton.jit
    def _tanh(x):
        return libdevice.tanh(x)

    @triton.jit
    def _bf16(f):  # value of f rounded to bf16 (cvt.rn.bf16.f32), as fp32
        return f.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _load_bf16(ptr, mask):  # ptr: the int16 view of a bf16 tensor; mask None: every element (no predicate)
        if mask is None:
            x = tl.load(ptr)
        else:
            x = tl.load(ptr, mask=mask, other=0)
        return x.to(tl.bfloat16, bitcast=True).to(tl.float32)

    @triton.jit
    def _store_bf16(ptr, f, mask):  # f holds a bf16 value: the conversion is exact
        tl.store(ptr, f.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)

    @triton.jit
    def _fp8_dequant(y):  # clamp(y, -448, 448) -> float8_e4m3fn (cvt.rn.satfinite) -> fp32
        return tl.clamp(y, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv).to(tl.float32)

    @triton.jit
    def _fp8_codes(y):  # the same code, as its bits
        return tl.clamp(y, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def _to_model(f, DT: tl.constexpr):
    """Round fp32 to the model dtype (0: bf16, 1: fp32); the result is an fp32 holding that value."""
    if DT == 0:
        return _bf16(f)
    else:
        return f


@triton.jit
def _load_model(ptr, mask, DT: tl.constexpr):
    if DT == 0:
        return _load_bf16(ptr, mask)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_model(ptr, f, mask, DT: tl.constexpr):
    """Store ``f`` (already a value of the model dtype) into a tensor of that dtype (bf16: its int16 view)."""
    if DT == 0:
        _store_bf16(ptr, f, mask)
    else:
        tl.store(ptr, f, mask=mask)


@triton.jit
def _gelu_tanh(x, VARIANT: tl.constexpr):
    # 0.5 * x * (1 + tanh(beta * (x + kappa * x^3))), the operation order of PyTorch's CUDA kernel;
    # VARIANT 0: nvcc contracted x + kappa * x^3 into an FMA, 1: it did not (the check picks the one that
    # matches F.gelu on every bf16 input). The literals are float(M_SQRT2 * M_2_SQRTPI * 0.5) and
    # float(0.044715) written exactly (they are fp32 values, so Triton's conversion keeps them).
    x3 = _mul(_mul(x, x), x)
    if VARIANT == 0:
        s = _fma(0.044714998453855515, x3, x)
    else:
        s = _add(x, _mul(0.044714998453855515, x3))
    t = _tanh(_mul(0.7978845834732056, s))
    return _mul(_mul(0.5, x), _add(1.0, t))


@triton.jit
def act_kernel(X, stride_x, SC, SH, stride_mod, rows_per_batch, SM, H, stride_h, Q, stride_q, SX, K,
               PRE: tl.constexpr, DT: tl.constexpr, HAS_SMOOTH: tl.constexpr, STORE_H: tl.constexpr,
               QUANT: tl.constexpr, GRID: tl.constexpr, GELU: tl.constexpr, BLOCK: tl.constexpr):
    """One row (token) per program.

    PRE 0: X is the activation (model dtype); 1: X is an fp32 LayerNorm output, h = n * (1 + scale) + shift
    rounded to the model dtype (Wan's modulation); 2: X is fp32, h = X rounded to the model dtype;
    3: X is the model dtype, h = gelu_tanh(X) rounded to the model dtype.
    STORE_H: write h to H. QUANT 0: nothing more; 1: write dequantize(quantize(h)) to Q (model dtype);
    2: write the codes to Q (int8, or float8 bits as uint8) and the fp32 scale to SX.
    HAS_SMOOTH: h is multiplied by SM (1/s) and rounded to the model dtype before quantization.
    GRID 0: int8 (absmax/127), 1: float8 e4m3 (absmax/448).
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    if PRE == 0:
        v = _load_model(X + row * stride_x + offs, mask, DT)
    elif PRE == 3:
        v = _to_model(_gelu_tanh(_load_model(X + row * stride_x + offs, mask, DT), GELU), DT)
    else:
        n = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
        if PRE == 1:
            b = row // rows_per_batch
            sc = tl.load(SC + b * stride_mod + offs, mask=mask, other=0.0)
            sh = tl.load(SH + b * stride_mod + offs, mask=mask, other=0.0)
            n = _add(_mul(n, _add(sc, 1.0)), sh)
        v = _to_model(n, DT)
    if STORE_H:
        _store_model(H + row * stride_h + offs, v, mask, DT)
    if QUANT != 0:
        if HAS_SMOOTH:
            v = _to_model(_mul(v, tl.load(SM + offs, mask=mask, other=1.0)), DT)
        # Masked lanes hold 0 (loads default to 0, and every pre-op maps 0 to 0): they never raise absmax.
        # NaN-propagating max, as torch.amax (the GPU's plain max drops NaN).
        amax = tl.reduce(tl.abs(v), 0, _nanmax)
        if GRID == 0:
            s = tl.div_rn(amax, 127.0)
        else:
            s = tl.div_rn(amax, 448.0)
        s = tl.where(amax == 0.0, 1.0, s)
        y = tl.div_rn(v, s)
        if QUANT == 1:
            if GRID == 0:
                q = tl.clamp(_rint(y), -128.0, 127.0, propagate_nan=tl.PropagateNan.ALL)
            else:
                q = _fp8_dequant(y)
            _store_model(Q + row * stride_q + offs, _to_model(_mul(q, s), DT), mask, DT)
        else:
            if GRID == 0:
                q = tl.clamp(_rint(y), -128.0, 127.0, propagate_nan=tl.PropagateNan.ALL)
                code = tl.where(q != q, 0.0, q).to(tl.int8)  # int8 has no NaN: the row's NaN scale carries it
            else:
                code = _fp8_codes(y)
            tl.store(Q + row * stride_q + offs, code, mask=mask)
            tl.store(SX + row, s)


@triton.jit
def _round_minifloat(y, MIN_EXP: tl.constexpr, MB: tl.constexpr, MAXV: tl.constexpr):
    """numbers.minifloat_round: |y| saturated at MAXV (NaN stays), its exponent floor(log2|y|) read from the bits
    (at least MIN_EXP: a fixed spacing below, the subnormals), rounded half to even at spacing 2^(exp - MB), sign
    kept. The eager twin takes the exponent from fp32 log2, which can round a value just below 2^k up to k; either
    spacing then rounds that value to 2^k, so the codes agree."""
    a = tl.abs(y)
    a = tl.where(a > MAXV, MAXV, a)  # NaN compares false and stays NaN
    e = tl.maximum(((a.to(tl.uint32, bitcast=True) >> 23).to(tl.int32)) - 127, MIN_EXP)
    inv_step = ((127 + MB - e) << 23).to(tl.float32, bitcast=True)  # 2^(MB - e): exact power-of-two scaling
    step = ((127 - MB + e) << 23).to(tl.float32, bitcast=True)
    r = _mul(_rint(_mul(a, inv_step)), step)
    r = tl.where(r > MAXV, MAXV, r)
    sign = (y.to(tl.uint32, bitcast=True) >> 31) << 31
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_grid(y, GRID: tl.constexpr, MIN_EXP: tl.constexpr, MB: tl.constexpr, QMAX: tl.constexpr):
    """The fp32 code of ``y`` on a grid (numbers.GRIDS): 0 int8, 1 float8 e4m3, 2 a minifloat, 3 int4."""
    if GRID == 0:
        return tl.clamp(_rint(y), -128.0, 127.0, propagate_nan=tl.PropagateNan.ALL)
    elif GRID == 1:
        return _fp8_dequant(y)
    elif GRID == 2:
        return _round_minifloat(y, MIN_EXP, MB, QMAX)
    else:
        return tl.clamp(_rint(y), -8.0, 7.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pow2_bits(e):
    """2^e as fp32 for an integer e in [-127, 127] (2^-127 is subnormal)."""
    return tl.where(e >= -126, ((e + 127) << 23), 0x00400000).to(tl.float32, bitcast=True)


@triton.jit
def _group_absmax_scale(v, amax_floor, QMAX: tl.constexpr, SCALE_BF16: tl.constexpr):
    """(absmax, absmax / QMAX) per group (row of v) as numbers.scale_from_absmax: fp32 or rounded to bf16, all-zero
    groups 1. Masked lanes hold 0 and never raise a group's absmax; NaN propagates, as torch.amax."""
    amax = tl.reduce(tl.abs(v), 1, _nanmax)
    if amax_floor > 0:
        amax = tl.maximum(amax, amax_floor, propagate_nan=tl.PropagateNan.ALL)
    s = tl.div_rn(amax, QMAX)
    if SCALE_BF16:
        s = _bf16(s)
    return amax, tl.where(amax == 0.0, 1.0, s)


@triton.jit
def group_quant_kernel(X, stride_x, SM, Q, stride_q, SCALE, SX, K, amax_floor,
                       DT: tl.constexpr, HAS_SMOOTH: tl.constexpr, GRID: tl.constexpr, MIN_EXP: tl.constexpr,
                       MB: tl.constexpr, QMAX: tl.constexpr, EMAX: tl.constexpr, MODE: tl.constexpr,
                       SCALE_BF16: tl.constexpr, E2M1: tl.constexpr, CODES: tl.constexpr, G: tl.constexpr,
                       G_P2: tl.constexpr, BLOCK_G: tl.constexpr):
    """dequantize(quantize(x)) of one row's BLOCK_G groups of G elements, in the model dtype: scheme.fake_quantize
    of a token-group (or static per-tensor) activation scheme, op for op.

    MODE 0: scale absmax / QMAX in fp32 (SCALE_BF16: rounded to bf16), all-zero groups 1; 1: e8m0, the smallest
    power of two >= absmax / QMAX (lightx2v's MX kernels); 2: e8m0 2^(floor(log2 absmax) - EMAX) (OCP MX v1.0);
    3: NVFP4, e4m3 group scales under the calibrated global scale G at SCALE (scheme._nvfp4_encode's order);
    4: the static scale at SCALE. ``amax_floor`` > 0 clamps each group's absmax from below. E2M1: absmax / 6 is
    computed as a product with fp32(1/6), as lightx2v's FP4 kernels do (scheme._over_qmax). CODES (e4m3, MODE 4 or
    0): the float8 bits of x / scale instead, and with MODE 0 the group scales into SX [rows, K / G] (the GEMM
    operands of fp8-pertensor and fp8-b128-deepgemm)."""
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, G_P2)
    offs = grp[:, None] * G + j[None, :]
    mask = (grp[:, None] < K // G) & (j[None, :] < G)
    v = _load_model(X + row * stride_x + offs, mask, DT)
    if HAS_SMOOTH:
        v = _to_model(_mul(v, tl.load(SM + offs, mask=mask, other=1.0)), DT)
    if MODE == 4 and CODES:
        tl.store(Q + row * stride_q + offs, _fp8_codes(tl.div_rn(v, tl.load(SCALE))), mask=mask)
    elif MODE == 0 and CODES:
        _, s = _group_absmax_scale(v, amax_floor, QMAX, SCALE_BF16)
        tl.store(Q + row * stride_q + offs, _fp8_codes(tl.div_rn(v, s[:, None])), mask=mask)
        tl.store(SX + row * (K // G) + grp, s, mask=grp < K // G)
    else:
        if MODE == 4:
            s = tl.load(SCALE)
            q = _mul(_round_grid(tl.div_rn(v, s), GRID, MIN_EXP, MB, QMAX), s)
        elif MODE == 0:
            _, s = _group_absmax_scale(v, amax_floor, QMAX, SCALE_BF16)
            q = _mul(_round_grid(tl.div_rn(v, s[:, None]), GRID, MIN_EXP, MB, QMAX), s[:, None])
        else:
            # masked lanes hold 0 and never raise a group's absmax; NaN propagates, as torch.amax
            amax = tl.reduce(tl.abs(v), 1, _nanmax)
            if amax_floor > 0:
                amax = tl.maximum(amax, amax_floor, propagate_nan=tl.PropagateNan.ALL)
            if E2M1:  # amax / qmax where the e8m0 and e4m3 scales take it (scheme._over_qmax)
                over = _mul(amax, 0.1666666716337204)
            else:
                over = tl.div_rn(amax, QMAX)
            if MODE == 3:
                g = tl.load(SCALE)
                s8 = _fp8_dequant(_mul(g, over))
                eff = tl.div_rn(s8, g)
                s8 = _fp8_dequant(_mul(eff, g))  # scheme._recover_e4m3: the same value, recovered as the eager path does
                ones = tl.full([BLOCK_G], 1.0, tl.float32)
                out = _mul(g, tl.where(s8 == 0.0, 0.0, tl.div_rn(ones, s8)))
                y = tl.clamp(_mul(v, out[:, None]), -QMAX, QMAX, propagate_nan=tl.PropagateNan.ALL)
                q = _mul(_round_grid(y, GRID, MIN_EXP, MB, QMAX), eff[:, None])
            else:
                if MODE == 1:  # ceil(log2(over)) from the bits; over is >= 0
                    u = over.to(tl.uint32, bitcast=True)
                    ex = (u >> 23).to(tl.int32)
                    man = u & 0x7FFFFF
                    e = tl.where(ex == 0, tl.where(man > 0x400000, -126, -127), ex - 127 + (man != 0).to(tl.int32))
                else:  # floor(log2(amax)) - EMAX from the bits (a subnormal's from its mantissa's, converted exactly)
                    u = amax.to(tl.uint32, bitcast=True)
                    ex = (u >> 23).to(tl.int32)
                    man = u & 0x7FFFFF
                    sub = (man.to(tl.float32).to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127 - 149
                    e = tl.where(amax == 0.0, -127, tl.where(ex == 0, sub, ex - 127) - EMAX)
                s = _pow2_bits(tl.minimum(tl.maximum(e, -127), 127))
                s = tl.where((amax == amax) & (amax != float("inf")), s, float("nan"))
                q = _mul(_round_grid(tl.div_rn(v, s[:, None]), GRID, MIN_EXP, MB, QMAX), s[:, None])
        _store_model(Q + row * stride_q + offs, _to_model(q, DT), mask, DT)


@triton.jit
def gated_residual_kernel(Hs, A, G, OUT, K, rows_per_batch, stride_g,
                          DT: tl.constexpr, A_DT: tl.constexpr, BLOCK: tl.constexpr):
    """out = (h.float() + a.float() * gate).to(model dtype): the residual update of a Wan block."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    h = _load_model(Hs + row * K + offs, mask, DT)
    a = _load_model(A + row * K + offs, mask, A_DT)
    g = tl.load(G + (row // rows_per_batch) * stride_g + offs, mask=mask, other=0.0)
    _store_model(OUT + row * K + offs, _to_model(_add(h, _mul(a, g)), DT), mask, DT)


@triton.jit
def int8_epilogue_kernel(ACC, SX, WS, BIAS, OUT, M, N, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = (acc.float() * sx * ws + bias.float()).to(bf16): lightx2v's int8 epilogue in one pass."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < N
    mask = mm[:, None] & mn[None, :]
    idx = rm.to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.load(ACC + idx, mask=mask, other=0).to(tl.float32)
    sx = tl.load(SX + rm, mask=mm, other=1.0)
    ws = tl.load(WS + rn, mask=mn, other=1.0)
    y = _mul(_mul(acc, sx[:, None]), ws[None, :])
    if HAS_BIAS:
        y = _add(y, _load_bf16(BIAS + rn, mn)[None, :])
    _store_bf16(OUT + idx, _bf16(y), mask)


@triton.jit
def rope_kernel(X, COS, SIN, OUT, S, K, D, DT: tl.constexpr, BLOCK: tl.constexpr):
    """Wan's rotary embedding of one token (all heads): for each pair (x1, x2) = x[2j], x[2j+1] with
    c = cos[2j], s = sin[2j+1] of its position, out = ((x1 c - x2 s), (x1 s + x2 c)) in fp32, rounded to
    the model dtype: diffusers' apply_rotary_emb."""
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK)  # pair index within the token's K // 2 pairs
    mask = p < K // 2
    base = X + row * K
    x1 = _load_model(base + 2 * p, mask, DT)
    x2 = _load_model(base + 2 * p + 1, mask, DT)
    f = (row % S) * D + 2 * (p % (D // 2))
    c = tl.load(COS + f, mask=mask, other=0.0)
    s = tl.load(SIN + f + 1, mask=mask, other=0.0)
    even = _sub(_mul(x1, c), _mul(x2, s))
    odd = _add(_mul(x1, s), _mul(x2, c))
    _store_model(OUT + row * K + 2 * p, _to_model(even, DT), mask, DT)
    _store_model(OUT + row * K + 2 * p + 1, _to_model(odd, DT), mask, DT)
