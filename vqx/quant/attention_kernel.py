"""The fused path of quantized attention: a Triton pass that quantizes Q, K and V as the GEMMs read them, then one
Triton flash-attention kernel over them, which quantizes each tile's P on the fly.

The prep (`kernel_inputs`) gives the eager path's codes and scales bit for bit (vqx.quant.attention.quantize_inputs;
tests/test_attention.py checks it): int8 and fp8 Q and K in one pass per tensor (the scale groups' absmax, then the
codes; a group period Triton cannot tile takes a token-absmax pass and the eager path's group ops), V per channel,
nvfp4's FP4 values per 1x16 block; the smoothing means (`smoothing_means`) subtracted as the prep reads Q and K,
SageAttention3's bias ``q_group_mean . k`` one row per 128-query group. On the GPU the GEMMs read the operands natively: int8 Q.K on int8 tensor cores, fp8
e4m3 P.V on fp8 ones (P converted with cvt.rn.satfinite, the eager path's rounding; V written transposed so both
operands are K-major, as SageAttention2 lays it out), fp8 Q.K codes as fp16 (exact; see `FP8_QK_ACC`), fp16 P.V
accumulated in fp16 per tile (SageAttention1), nvfp4 values in bf16. The output is written as [B, Lq, H, D], the
layout Wan's output projection reads. nvfp4 P's key tiles run in `_tile_keys`' order (each 16-key block in one
thread's registers; K, V and the bias read in the same order, so P.V is unchanged), and P over its block's unrounded
scale comes straight from the scores, ``exp2(s - block max + log2 6)``, as sageattn3 computes it (the eager path
divides p by absmax / 6). For nvfp4 Q.K and P.V a second kernel (`qattn_nvfp4_fwd`, the same tile math) reads every
operand by TMA, K, V and the bias written in that key order by the prep itself (`kernel_inputs`' key_tiles: no
copy; the bias in bf16), and can run warp-specialized: a producer warpgroup loads while two consumer warpgroups each
run 64 query rows, one's softmax overlapping the other's GEMMs;
`CONFIGS` names the kernel each pair runs. What differs from the eager path
is the order of fp32 accumulation, ``exp2`` (the GPU's approximate ex2; the compiler fuses the scaling with the
max's subtraction into one fma) and the tile products' accumulation inside the tensor cores (fp16 for fp16 P.V; Hopper's
fp8 accumulator keeps fewer bits than fp32, each tile's product added to the fp32 accumulator on its own, as
SageAttention2 does). `attention_fused` therefore uses the kernel only after it matched the eager path on
adversarial inputs within `TOLERANCE` (once per scheme, head dim, dtype and device; vqx.quant.fastpath's check
registry and report), and falls back to the eager path otherwise.
"""

from __future__ import annotations

import functools
import re

import torch
import triton
import triton.language as tl

from . import fastpath as fp
from .attention import (FP8_E4M3_MAX, LOG2E, SAGE3_Q_GROUP, AttentionScheme, attention_eager, divide, group_layout,
                        group_max, k_groups, p_log2_offset, q_groups, quantize_inputs, smoothing_means)
from .kernels import INTERPRET, _bf16, _fp8_codes, _fp8_dequant, _load_bf16, _round_e4m3, _store_bf16

# Fused vs eager, per output row: |difference| <= tolerance(scheme) * the row's largest |eager output|. Measured on
# the H200 and an H100 (bench/results/attention_kernel.json "checks"): at most 3.0e-3 for nvfp4 (bf16 values, fp32
# accumulation; 2.98e-3 with P quantized as sageattn3 does, on both GPUs on 2026-12-07),
# 7.75e-3 for fp16 P.V (sage1: the tensor cores round the tile's partial sums to fp16 as they go, the
# eager path rounds the tile's sum once) and for fp8 P.V (Hopper's fp8 accumulator); one bf16 step of the row's
# largest value is 3.9e-3 to 7.8e-3; through the CPU interpreter at most 3.3e-3. Allowed: about twice the measured.
TOLERANCE = {"fp16": 2 ** -6, "fp8": 2 ** -6, "nvfp4": 2 ** -7}
PV_CODE = {"fp16": 0, "fp8": 1, "nvfp4": 2}
QUANT_CODE = {"int8": 0, "fp8": 1}


@triton.jit
def _round_e2m1(y, SATURATE: tl.constexpr = True):
    """y >= 0 onto E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6), ties to even, saturating. One IEEE addition rounds: for y in
    [2**e, 2**(e + 1)) (e >= 0; below 1 the subnormal step 0.5), c = 2**(e + 22) has an ulp of 2**(e - 1), E2M1's
    step there, so (y + c) - c is y rounded half to even onto that step (6 cannot round past 6: 5 ties to 4). Both
    are fmas of the binade 2**e: b * 2**22 is exact, so each rounds once, as the addition and the subtraction do.
    SATURATE False: the caller guarantees y < 7 (which rounds to at most 6 without the clamp)."""
    a = y
    if SATURATE:
        a = tl.minimum(y, 6.0)
    binade = (tl.maximum(a, 1.0).to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.math.fma(binade, -4194304.0, tl.math.fma(binade, 4194304.0, a))


RN_SIXTH = tl.constexpr(0.16666667163372040)  # 1 / 6 rounded to fp32: 0x3E2AAAAB
LOG2_6 = tl.constexpr(2.5849626064300537)  # log2(6) rounded to fp32: 0x40257007

if INTERPRET:  # numpy's fp32 division is IEEE's; the interpreter's fma rounds twice, so the steps below would not be
    @triton.jit
    def _div6(x):
        return x / 6.0

    @triton.jit
    def _reciprocal_e4m3(s):
        return 1.0 / s

    @triton.jit
    def _log2_p_scale_up(block_max, row_scale):
        return block_max * row_scale - LOG2_6

    P_CODES_SATURATE = tl.constexpr(True)  # no directed rounding above: the clamp keeps E2M1's range
else:
    @triton.jit
    def _div6(x):
        """x / 6 rounded to nearest, as IEEE division gives it, in three fp32 ops: the product with RN(1/6), then one
        fma-corrected step (the remainder x - 6q is exact). Checked for every fp32 significand, which covers every x
        whose quotient is normal; smaller quotients are far below e4m3's smallest step: their scale is 0 either way."""
        q = x * RN_SIXTH
        return tl.math.fma(tl.math.fma(q, -6.0, x), RN_SIXTH, q)

    @triton.jit
    def _reciprocal_e4m3(s):
        """1 / s rounded to nearest for an e4m3 value s > 0: the approximate division and one Newton step, exact for
        each of e4m3's 8 significands from any start within 2 ulp (checked)."""
        r = tl.fdiv(tl.full(s.shape, 1.0, tl.float32), s)  # div.full.f32: within 2 ulp
        return tl.math.fma(tl.math.fma(-s, r, 1.0), r, r)

    @triton.jit
    def _log2_p_scale_up(block_max, row_scale):
        """block_max * row_scale - log2 6 in one fma rounded up: a nvfp4 P block's exponents s * row_scale - this
        (s <= block_max), rounded to nearest, are at most log2 6 for any finite scores, so P over its block scale
        stays below 7 and E2M1's rounding needs no clamp."""
        return tl.inline_asm_elementwise("fma.rp.f32 $0, $1, $2, 0fC0257007;", "=r,r,r", [block_max, row_scale],
                                         dtype=tl.float32, is_pure=True, pack=1)

    P_CODES_SATURATE = tl.constexpr(False)


@triton.jit
def _expand(x, AXES: tl.constexpr):
    """x with size-1 axes put back at AXES (descending), the inverse of reducing over them."""
    for i in tl.static_range(len(AXES)):
        x = tl.expand_dims(x, AXES[len(AXES) - 1 - i])
    return x


@triton.jit
def _nvfp4_blocks(x, AXIS: tl.constexpr):
    """SageAttention3's FP4 values of Q, K or V (fp4_quantization_4d.cu), blocks of 16 along AXIS:
    ``sf = e4m3(absmax / 6)`` (saturating), ``e2m1(x * (1 / sf)) * sf``, as vqx.quant.attention.quantize_nvfp4."""
    sf = _round_e4m3(_div6(tl.max(tl.abs(x), AXIS)))
    y = x * tl.expand_dims(tl.where(sf == 0.0, 0.0, _reciprocal_e4m3(sf)), AXIS)
    mag = _round_e2m1(tl.abs(y))
    return tl.where(y < 0.0, -mag, mag) * tl.expand_dims(sf, AXIS)


@triton.jit
def _tile_keys(offs_n, PERMUTE: tl.constexpr):
    """The key each column of a score tile holds. PERMUTE: within every 64 columns, column 8j + 2b + e holds key
    16b + 2j + e, so that the 16 keys of nvfp4 block b are the columns one thread of an mma / wgmma accumulator
    holds in a row (Ampere's and Hopper's layouts give thread t of a quad the pairs at 8j + 2t): its block max is
    in-register, with no shuffle, and it computes each block's scale once. K, V, and the key-indexed loads follow
    the same order, so P.V, which sums over the keys, is unchanged."""
    if PERMUTE:
        c = offs_n % 64
        return offs_n - c + 16 * ((c // 2) % 4) + 2 * (c // 8) + c % 2
    return offs_n


@triton.jit
def _key_columns(keys):
    """`_tile_keys`' inverse: the column of each key (key 16b + 2j + e of every 64 in column 8j + 2b + e)."""
    c = keys % 64
    return keys - c + 8 * ((c % 16) // 2) + 2 * (c // 16) + c % 2


# ---- the prep: Q, K, V [B, H, L, D] (bf16, any strides with D contiguous) -> codes [B, H, L, D] contiguous ----

@triton.jit
def _load_tokens(X, MEAN, bh, H, rows, offs_d, L, sx_b, sx_h, sx_l, prescale, D: tl.constexpr,
                 HAS_MEAN: tl.constexpr, MEAN_GROUP: tl.constexpr, PRESCALE: tl.constexpr):
    """The values the eager quantizer sees: bf16 input, minus its smoothing mean in bf16 (`smoothing_means`: K's
    token mean, MEAN [B*H, D] with MEAN_GROUP 0; Q's per-MEAN_GROUP-token means, MEAN [B*H, groups, D]), times Q's
    prescale in fp32."""
    ok = rows < L
    x = _load_bf16(X + (bh // H) * sx_b + (bh % H) * sx_h + rows[:, None] * sx_l + offs_d[None, :], ok[:, None])
    if HAS_MEAN:
        if MEAN_GROUP == 0:
            x = _bf16(x - _load_bf16(MEAN + bh * D + offs_d, offs_d < D)[None, :])
        else:
            group = bh * tl.cdiv(L, MEAN_GROUP) + rows // MEAN_GROUP
            x = _bf16(x - _load_bf16(MEAN + group[:, None] * D + offs_d[None, :], ok[:, None]))
    if PRESCALE:
        x = x * prescale
    return x


@triton.jit
def token_absmax(X, MEAN, Out, H, L, sx_b, sx_h, sx_l, prescale, D: tl.constexpr, BLOCK_L: tl.constexpr,
                 HAS_MEAN: tl.constexpr, MEAN_GROUP: tl.constexpr, PRESCALE: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    x = _load_tokens(X, MEAN, bh, H, rows, tl.arange(0, D), L, sx_b, sx_h, sx_l, prescale, D, HAS_MEAN, MEAN_GROUP,
                     PRESCALE)
    tl.store(Out + bh * L + rows, tl.max(tl.abs(x), 1), mask=rows < L)


@triton.jit
def _store_codes(Out, bh, L, D: tl.constexpr, rows, offs_d, y, ok, GRID: tl.constexpr, OUT_LD):
    """Codes of y = x / scale: int8 rounded half away from zero and clamped to 127 (GRID 0, SageAttention's
    quantizer), e4m3 bits (GRID 1); rows of D (OUT_LD 0) or, transposed, [D, OUT_LD] per head (V^T for the fp8 P.V
    tensor cores)."""
    if OUT_LD == 0:
        dst = Out + bh * L * D + rows[:, None] * D + offs_d[None, :]
    else:
        dst = Out + bh * D * OUT_LD + offs_d[None, :] * OUT_LD + rows[:, None]
    if GRID == 0:
        c = (y + tl.where(y >= 0.0, 0.5, -0.5)).to(tl.int32)  # the conversion truncates toward zero
        tl.store(dst, tl.minimum(tl.maximum(c, -127), 127).to(tl.int8), mask=ok[:, None])
    else:
        tl.store(dst, _fp8_codes(y), mask=ok[:, None])


@triton.jit
def quantize_tokens(X, MEAN, S, Out, H, L, sx_b, sx_h, sx_l, prescale, out_ld, D: tl.constexpr, BLOCK_L: tl.constexpr,
                    HAS_MEAN: tl.constexpr, MEAN_GROUP: tl.constexpr, PRESCALE: tl.constexpr, GRID: tl.constexpr,
                    PER_CHANNEL: tl.constexpr):
    """Codes of x / scale (given per token or per channel); a zero scale divides by 1, as the eager path."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    ok = rows < L
    x = _load_tokens(X, MEAN, bh, H, rows, offs_d, L, sx_b, sx_h, sx_l, prescale, D, HAS_MEAN, MEAN_GROUP, PRESCALE)
    if PER_CHANNEL:
        s = tl.load(S + bh * D + offs_d)[None, :]
    else:
        s = tl.load(S + bh * L + rows, mask=ok, other=1.0)[:, None]
    _store_codes(Out, bh, L, D, rows, offs_d, tl.div_rn(x, tl.where(s == 0.0, 1.0, s)), ok, GRID, out_ld)


@triton.jit
def quantize_groups(X, MEAN, S, Out, H, L, sx_b, sx_h, sx_l, prescale, limit, eps, D: tl.constexpr,
                    PERIODS: tl.constexpr, R1: tl.constexpr, G: tl.constexpr, R2: tl.constexpr,
                    HAS_MEAN: tl.constexpr, MEAN_GROUP: tl.constexpr, PRESCALE: tl.constexpr, GRID: tl.constexpr):
    """Scales and int8 / e4m3 codes (GRID as `_store_codes`) in one pass, PERIODS periods of R1 * G * R2 tokens per
    program: token r1 * G * R2 + g * R2 + r2 of a period is in the period's group g (block / warp: one group;
    SageAttention2's per-thread Q: G = 8, K: G = 4, R2 = 2). Scale ``group absmax / limit + eps`` per token, as the
    eager quantizer."""
    bh = tl.program_id(1)
    T: tl.constexpr = PERIODS * R1 * G * R2
    rows = tl.program_id(0) * T + tl.arange(0, T)
    offs_d = tl.arange(0, D)
    ok = rows < L
    x = _load_tokens(X, MEAN, bh, H, rows, offs_d, L, sx_b, sx_h, sx_l, prescale, D, HAS_MEAN, MEAN_GROUP, PRESCALE)
    tok = tl.where(ok, tl.max(tl.abs(x), 1), 0.0)  # rows past L read as 0 minus K's mean
    gmax = tl.max(tl.max(tl.reshape(tok, (PERIODS, R1, G, R2)), 3), 1)  # [PERIODS, G]
    s = tl.div_rn(gmax, limit) + eps
    s = tl.reshape(tl.broadcast_to(tl.expand_dims(tl.expand_dims(s, 1), 3), (PERIODS, R1, G, R2)), (T,))
    tl.store(S + bh * L + rows, s, mask=ok)
    _store_codes(Out, bh, L, D, rows, offs_d, tl.div_rn(x, tl.where(s == 0.0, 1.0, s)[:, None]), ok, GRID, 0)


@triton.jit
def nvfp4_values(X, MEAN, Out, H, L, L_OUT, sx_b, sx_h, sx_l, D: tl.constexpr, BLOCK_L: tl.constexpr,
                 ALONG_TOKENS: tl.constexpr, HAS_MEAN: tl.constexpr, MEAN_GROUP: tl.constexpr,
                 KEY_ORDER: tl.constexpr):
    """x [B, H, L, D] bf16, less its smoothing mean (`_load_tokens`) -> its FP4 values [B, H, L_OUT, D] bf16 (exact):
    1x16 blocks along D (Q, K) or along the tokens (V; tokens past L count as the zeros they are padded with).
    KEY_ORDER: the rows padded with zeros to L_OUT (whole key tiles) and stored in `key_order`'s order, as the TMA
    kernel reads them (key 16b + 2j + e of every 64 in row 8j + 2b + e)."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    x = _load_tokens(X, MEAN, bh, H, rows, offs_d, L, sx_b, sx_h, sx_l, 1.0, D, HAS_MEAN, MEAN_GROUP, False)
    if KEY_ORDER:  # the padding keys are zeros, whatever the mean
        x = tl.where((rows < L)[:, None], x, 0.0)
    if ALONG_TOKENS:
        val = tl.reshape(_nvfp4_blocks(tl.reshape(x, (BLOCK_L // 16, 16, D)), 1), (BLOCK_L, D))
    else:
        val = tl.reshape(_nvfp4_blocks(tl.reshape(x, (BLOCK_L, D // 16, 16)), 2), (BLOCK_L, D))
    dst = rows
    if KEY_ORDER:
        dst = _key_columns(rows)
    _store_bf16(Out + bh * L_OUT * D + dst[:, None] * D + offs_d[None, :], val, (rows < L_OUT)[:, None])


def _nvfp4(x: torch.Tensor, along_tokens: bool, mean: torch.Tensor | None = None, mean_group: int = 0,
           key_tile: int = 0) -> torch.Tensor:
    """x [B, H, L, D] bf16 (D contiguous), less `mean` (`_load_tokens`) -> quantize_nvfp4's values along D or the
    tokens, bf16 contiguous; key_tile (a multiple of 64): in `key_order(values, key_tile, -2)`'s layout instead."""
    b, h, n, d = x.shape
    assert x.stride(3) == 1 and key_tile % 64 == 0
    block_l = max(16, min(64, 8192 // d))  # divides 64: each row's key-order row is its own program's to write
    n_out = -(-n // key_tile) * key_tile if key_tile else n
    out = torch.empty(b, h, n_out, d, dtype=torch.bfloat16, device=x.device)
    xi = x.view(torch.int16)
    nvfp4_values[(fp.triton_cdiv(n_out, block_l), b * h)](
        xi, mean.contiguous().view(torch.int16) if mean is not None else xi, out.view(torch.int16), h, n, n_out,
        x.stride(0), x.stride(1), x.stride(2), D=d, BLOCK_L=block_l, ALONG_TOKENS=along_tokens,
        HAS_MEAN=mean is not None, MEAN_GROUP=mean_group, KEY_ORDER=key_tile > 0)
    return out


def _quantize(x: torch.Tensor, grid: str, s: AttentionScheme | None, operand: str, mean: torch.Tensor | None = None,
              prescale: float | None = None, v_stride: int = 0,
              mean_group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] bf16, less `mean` (`_load_tokens`) -> (codes, scales) equal to the eager quantizer's: Q or K
    (operand "q" / "k") with scales per token [B, H, L, 1] from `s`'s groups; V (s None) per channel [B, H, 1, D].
    Codes [B, H, L, D] int8 /
    float8_e4m3fn; for V with v_stride, written transposed into [B, H, D, v_stride] and returned as the
    [B, H, L, D] view of it."""
    b, h, n, d = x.shape
    assert x.stride(3) == 1
    strides = (x.stride(0), x.stride(1), x.stride(2))
    xi = x.view(torch.int16)
    mi = mean.contiguous().view(torch.int16) if mean is not None else xi
    flags = dict(D=d, HAS_MEAN=mean is not None, MEAN_GROUP=mean_group, PRESCALE=prescale is not None)
    pre = float(prescale) if prescale is not None else 1.0
    limit = 127.0 if grid == "int8" else FP8_E4M3_MAX
    out_dtype = torch.int8 if grid == "int8" else torch.float8_e4m3fn
    if v_stride:
        store = torch.empty(b, h, d, v_stride, dtype=out_dtype, device=x.device)
        codes = store[..., :n].transpose(-1, -2)
    else:
        codes = store = torch.empty(b, h, n, d, dtype=out_dtype, device=x.device)
    out = store.view(torch.uint8) if out_dtype == torch.float8_e4m3fn else store
    eps = s.scale_eps if s is not None and grid == "int8" else 0.0  # as int8_codes (fp8 has no eps)
    layout = group_layout(s, operand) if s is not None else None
    period = layout[0] * layout[1] * layout[2] if layout else 0
    # One pass where a power-of-two period fits (int8 and fp8 alike: the same scales and codes as the two passes,
    # bit for bit; tests/test_attention.py and tests/test_cuda.py check it with `prep_mismatches`).
    if layout and period & (period - 1) == 0 and period * d <= 16384:
        periods = max(1, 64 // period)
        scale = torch.empty(b, h, n, 1, dtype=torch.float32, device=x.device)
        quantize_groups[(fp.triton_cdiv(n, periods * period), b * h)](
            xi, mi, scale, out, h, n, *strides, pre, limit, eps, PERIODS=periods, R1=layout[0], G=layout[1],
            R2=layout[2], GRID=QUANT_CODE[grid], num_warps=8 if periods * period * d > 8192 else 4, **flags)
        return codes, scale
    block_l = max(1, min(64, 8192 // d))
    grid_ = (fp.triton_cdiv(n, block_l), b * h)
    if layout is None:  # V: per channel over the tokens, as quantize_v
        scale = divide(torch.linalg.vector_norm(x, float("inf"), dim=2, keepdim=True).float(), limit).contiguous()
    else:  # a period the one pass cannot tile: token maxima here, the groups with the eager path's ops
        tok = torch.empty(b, h, n, dtype=torch.float32, device=x.device)
        token_absmax[grid_](xi, mi, tok, h, n, *strides, pre, BLOCK_L=block_l, **flags)
        groups = q_groups(n, s, x.device) if operand == "q" else k_groups(n, s, x.device)
        scale = divide(group_max(tok, groups).unsqueeze(-1), limit) + eps
    quantize_tokens[grid_](xi, mi, scale, out, h, n, *strides, pre, v_stride, BLOCK_L=block_l, GRID=QUANT_CODE[grid],
                           PER_CHANNEL=layout is None, **flags)
    return codes, scale


def kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionScheme,
                  key_tiles: bool = False) -> dict:
    """The kernel's operands for bf16 q, k, v [B, H, L, D]: int8 / fp8 codes and fp32 scales, or FP4 values (bf16,
    exact) for nvfp4; V as fp16, fp8 codes or FP4 values; with SageAttention3's Q smoothing, the scores' bias
    ``q_group_mean . k`` [B, H, groups, Lk] in the input dtype, as the eager path's matmul. key_tiles (nvfp4 Q.K and
    P.V, `tma_kernel_applies`): K, V and the bias written as the TMA kernel reads them (`tma_operands`, ``key_tiles``
    True in the result), so that its launch copies nothing."""
    d = q.shape[-1]
    if key_tiles and not key_tiles_apply(s):
        raise ValueError(f"key_tiles: the TMA kernel's layout is for nvfp4 Q.K and P.V with tiles of 64n keys and no "
                         f"Q prescale, not {s.qk} / {s.pv} with {s.block_kv}-key tiles")
    log2_scale = 1.0 if s.q_prescale else (d ** -0.5) * LOG2E
    if s.qk == "nvfp4" and s.q_prescale:  # FP4 of the prescaled fp32 Q: the eager quantizer's
        x = quantize_inputs(q, k, v, s)
        bias = x.q_mean[:, :, ::SAGE3_Q_GROUP] @ x.k_smoothed.transpose(-1, -2) if x.q_mean is not None else None
        return dict(q=x.q, qs=None, k=x.k, ks=None, v=x.v, vs=x.v_scale, bias=bias, log2_scale=x.log2_scale,
                    p_offset=x.p_offset)
    k_mean, q_mean = smoothing_means(q, k, s)  # subtracted as the prep reads Q and K ...
    if key_tiles:
        return _nvfp4_key_tile_inputs(q, k, v, s, k_mean, q_mean, log2_scale)
    bias = None
    if q_mean is not None:  # ... but the bias is of the smoothed K itself
        k = k - k_mean if k_mean is not None else k
        k_mean, bias = None, q_mean @ k.transpose(-1, -2)
    if s.qk == "nvfp4":
        qc, qs = _nvfp4(q, False, q_mean, SAGE3_Q_GROUP), None
        kc, ks = _nvfp4(k, False, k_mean), None
    else:
        qc, qs = _quantize(q, s.qk, s, "q", mean=q_mean, mean_group=SAGE3_Q_GROUP,
                           prescale=(d ** -0.5) * LOG2E if s.q_prescale else None)
        kc, ks = _quantize(k, s.qk, s, "k", mean=k_mean)
    if s.pv == "fp16":
        vc, vs = torch.empty(v.shape, dtype=torch.float16, device=v.device).copy_(v), None
    elif s.pv == "fp8":  # written as V^T with 16-byte aligned rows (`launch`)
        vc, vs = _quantize(v, "fp8", None, "v", v_stride=-(-v.shape[2] // 16) * 16)
    else:
        vc, vs = _nvfp4(v, True), None
    return dict(q=qc, qs=qs, k=kc, ks=ks, v=vc, vs=vs, bias=bias, log2_scale=log2_scale, p_offset=p_log2_offset(s))


@functools.lru_cache(maxsize=32)
def _padding_columns(lk: int, tile: int, device: torch.device) -> tuple[int, torch.Tensor]:
    """(first, mask): in `key_order` of lk keys, the columns from `first` on that hold padding keys (a bool mask on
    `device`). Made on the host once per shape: no device sync per call."""
    first = lk // 64 * 64
    keys = key_order(torch.arange(lk), tile, 0, pad=-1)[first:]
    return first, (keys < 0).to(device)


def _nvfp4_key_tile_inputs(q, k, v, s: AttentionScheme, k_mean, q_mean, log2_scale: float) -> dict:
    """`kernel_inputs`' key_tiles operands: the prep writes K's and V's FP4 values in `key_order`, zeros at the padding
    keys; the bias is the matmul of Q's group means with K smoothed and laid out so, -inf at the padding keys (a
    zero bias where the scheme has none), in the dtype the kernel reads Q and K."""
    b, h, lq, _ = q.shape
    tile = s.block_kv
    qk_dtype, v_dtype = _operand_dtypes(s)
    if q_mean is not None:  # the bias is of the smoothed K itself: smooth it as it is laid out, once
        k_tiles = key_order(k, tile, -2, minus=k_mean)
        kc = _nvfp4(k_tiles, False)
        bias = (q_mean @ k_tiles.transpose(-1, -2)).to(qk_dtype)
    else:
        kc = _nvfp4(k, False, k_mean, key_tile=tile)
        bias = torch.zeros(b, h, -(-lq // SAGE3_Q_GROUP), kc.shape[2], dtype=qk_dtype, device=q.device)
    first, padding = _padding_columns(k.shape[2], tile, q.device)
    bias[..., first:].masked_fill_(padding, float("-inf"))
    qc = _nvfp4(q, False, q_mean, SAGE3_Q_GROUP).to(qk_dtype)
    vc = _nvfp4(v, True, key_tile=tile).to(v_dtype)
    return dict(q=qc, qs=None, k=kc.to(qk_dtype), ks=None, v=vc, vs=None, bias=bias, log2_scale=log2_scale,
                p_offset=p_log2_offset(s), key_tiles=True)


# ---- the attention ------------------------------------------------------------------------------------------

@triton.jit
def _nvfp4_p(s, m_i, row_scale, p_offset, PDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr):
    """nvfp4 P of a score tile [BLOCK_M, BLOCK_N] in `_tile_keys`' order (each 16-key block in one thread's registers),
    its scores in log2 units s * row_scale: (P's values in PDT [BLOCK_M, BLOCK_N], the unquantized row sums, the new
    row max). MASKED: the tile may hold a block of -inf scores only."""
    s = tl.reshape(s, (BLOCK_M, BLOCK_N // 64, 8, 4, 2))  # axes (tile // 64, j, block, e)
    # [M, N / 64, 4]: of s, so that the row max reads 1/16 of the scores; in-register axes first
    s_max = tl.max(tl.max(s, 4), 2)
    rs = _expand(row_scale, (2, 1))
    block_max = s_max * rs
    m_new = tl.maximum(m_i, tl.max(tl.max(block_max, 1), 1))
    # sageattn3 divides each block of p by a = its largest p / 6, unrounded: p / a = exp2(s - block_max + log2 6)
    # (log2 units), free of the row max, one exp2 per score; p itself is only summed, as a * sum(p / a)
    a = tl.math.exp2(block_max - _expand(m_new - p_offset, (2, 1)) - LOG2_6)
    off = _log2_p_scale_up(s_max, tl.broadcast_to(rs, s_max.shape))
    if MASKED:  # a block of masked keys only: p / a = 0, not exp2(-inf + inf)
        off = tl.where(s_max == float("-inf"), 0.0, off)
    y = tl.math.exp2(s * _expand(row_scale, (4, 3, 2, 1)) - _expand(off, (4, 2)))
    row_sum = tl.sum(tl.sum(a * tl.sum(tl.sum(y, 4), 2), 2), 1)
    # codes times a's e4m3 (satfinite): both and the product exact in bf16, multiplied two at a time
    pq = _round_e2m1(y, P_CODES_SATURATE).to(PDT) * _expand(_fp8_dequant(a), (4, 2)).to(PDT)
    return tl.reshape(pq, (BLOCK_M, BLOCK_N)), row_sum, m_new


@triton.jit
def _tile(acc, l_i, m_i, q, qs, row_scale, K, KS, BIAS, V, V_STRIDE, start_n, lk, p_offset, offs_n, offs_d,
          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV: tl.constexpr,
          HAS_QK_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, QK_INT8: tl.constexpr, QK_FP8_ACC: tl.constexpr,
          NATIVE_FP8: tl.constexpr, MASK: tl.constexpr):
    """One key tile of the online softmax; MASK: the tile runs past lk (only the last one). The scores in log2 units
    are s * row_scale (log2_scale, times q_scale where no bias is added; > 0), so the maxima are of s, each scaled
    once (rounding is monotone: the same as the maxima of the scaled scores)."""
    cols = start_n + _tile_keys(offs_n, PV == 2 and BLOCK_N % 64 == 0)
    if MASK:
        col_ok = cols < lk
        k = tl.load(K + cols[:, None] * D + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(K + cols[:, None] * D + offs_d[None, :])
    if QK_INT8:  # int8 codes on int8 tensor cores: the exact integer dot, as SageAttention
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    elif QK_FP8_ACC:  # fp8 codes on fp8 tensor cores; every QK_FP8_ACC products of the dot added in fp32
        s = tl.dot(q, tl.trans(k), max_num_imprecise_acc=QK_FP8_ACC)
    else:
        s = tl.dot(q, tl.trans(k))
    if HAS_QK_SCALE:
        if MASK:
            ks = tl.load(KS + cols, mask=col_ok, other=0.0)
        else:
            ks = tl.load(KS + cols)
        if HAS_BIAS:
            s = s * (qs[:, None] * ks[None, :])
        else:  # q_scale is in row_scale: one multiply per score here
            s = s * ks[None, :]
    if HAS_BIAS:  # this query tile's group's row of q_group_mean . k, in the tile's column order (`bias_layout`)
        s = s + tl.load(BIAS + start_n + offs_n)[None, :]
    if MASK:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    if PV == 2 and BLOCK_N % 64 == 0:  # nvfp4 P in `_tile_keys`' order
        pq, row_sum, m_new = _nvfp4_p(s, m_i, row_scale, p_offset, V.dtype.element_ty, BLOCK_M, BLOCK_N, MASK)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)
        x = s * row_scale[:, None] - (m_new - p_offset)[:, None]
        if MASK:  # not -inf * row_scale: a zero query's row_scale is 0
            x = tl.where(col_ok[None, :], x, float("-inf"))
        p = tl.math.exp2(x)
        row_sum = tl.sum(p, 1)
        if PV == 2:  # nvfp4 P in key order: a block's keys span 4 lanes (slower); the eager path's IEEE ops
            pb = tl.reshape(p, (BLOCK_M, BLOCK_N // 16, 16))
            a = _div6(tl.max(pb, 2))
            y = tl.div_rn(pb, tl.where(a == 0.0, 1.0, a)[:, :, None])  # a block of zeros stays 0
            pq = tl.reshape(_round_e2m1(y) * _fp8_dequant(a)[:, :, None], (BLOCK_M, BLOCK_N))
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + row_sum
    acc = acc * alpha[:, None]
    if PV == 1:  # V^T [D, lk_pad] (K-major for the fp8 tensor cores, as SageAttention2 lays V out)
        if MASK:
            v = tl.trans(tl.load(V + offs_d[:, None] * V_STRIDE + cols[None, :], mask=col_ok[None, :], other=0.0))
        else:
            v = tl.trans(tl.load(V + offs_d[:, None] * V_STRIDE + cols[None, :]))
    elif MASK:
        v = tl.load(V + cols[:, None] * D + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    else:
        v = tl.load(V + cols[:, None] * D + offs_d[None, :])
    if PV == 0:  # fp16 P and V, the tile's product accumulated in fp16
        acc += tl.dot(p.to(tl.float16), v, out_dtype=tl.float16).to(tl.float32)
    elif PV == 1:  # fp8 e4m3 P (P <= 448) and V codes; the tile's product added to the fp32 accumulator
        if NATIVE_FP8:
            acc += tl.dot(p.to(tl.float8e4nv), v)
        else:
            acc += tl.dot(_round_e4m3(p).to(v.dtype), v)
    else:  # nvfp4 P: 1x16 blocks along the keys, e4m3 block scales
        acc += tl.dot(pq.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def qattn_fwd(Q, K, V, QS, KS, VS, BIAS, Out, H, lq, lk, v_stride, log2_scale, p_offset,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV: tl.constexpr,
              HAS_QK_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V_SCALE: tl.constexpr,
              QK_INT8: tl.constexpr, QK_FP8_ACC: tl.constexpr, NATIVE_FP8: tl.constexpr, Q_GROUP: tl.constexpr):
    """Out [B, Lq, H, D] (the layout Wan's output projection reads) from q [B*H, Lq, D], k [B*H, Lk, D] and v
    [B*H, Lk, D] or, for fp8 P.V, v^T [B*H, D, v_stride]; bias [B*H, groups of Q_GROUP queries, Lk] as
    `bias_layout` writes it."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < lq
    q = tl.load(Q + bh * lq * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    qs = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_QK_SCALE:
        qs = tl.load(QS + bh * lq + offs_m, mask=row_ok, other=0.0)
    row_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + log2_scale
    if HAS_QK_SCALE and not HAS_BIAS:
        row_scale = qs * log2_scale
    if HAS_BIAS:
        tl.static_assert(Q_GROUP % BLOCK_M == 0)
        BIAS += (bh * tl.cdiv(lq, Q_GROUP) + start_m * BLOCK_M // Q_GROUP) * (tl.cdiv(lk, BLOCK_N) * BLOCK_N)
    K += bh * lk * D
    if PV == 1:
        V += bh * v_stride * D
    else:
        V += bh * lk * D
    KS += bh * lk
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    full = (lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, qs, row_scale, K, KS, BIAS, V, v_stride, start_n, lk, p_offset,
                              offs_n, offs_d, D, BLOCK_M, BLOCK_N, PV, HAS_QK_SCALE, HAS_BIAS, QK_INT8, QK_FP8_ACC,
                              NATIVE_FP8, False)
    if full < lk:
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, qs, row_scale, K, KS, BIAS, V, v_stride, full, lk, p_offset,
                              offs_n, offs_d, D, BLOCK_M, BLOCK_N, PV, HAS_QK_SCALE, HAS_BIAS, QK_INT8, QK_FP8_ACC,
                              NATIVE_FP8, True)
    if HAS_V_SCALE:
        acc = acc * tl.load(VS + bh * D + offs_d)[None, :]
    out = acc / l_i[:, None]
    b, h = bh // H, bh % H
    dst = Out + b * lq * H * D + offs_m[:, None] * (H * D) + h * D + offs_d[None, :]
    _store_bf16(dst, _bf16(out), row_ok[:, None])


@triton.jit
def qattn_nvfp4_fwd(Q, K, V, BIAS, Out, H, lq, lk_pad, log2_scale, p_offset, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, Q_GROUP: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """nvfp4 Q.K and P.V with every operand read by TMA: q [B*H*Lq, D]; k and v [B*H*lk_pad, D], each head's keys
    padded to whole tiles and every 64 in `_tile_keys`' order (`key_order`); bias [B*H*groups of Q_GROUP queries,
    lk_pad] in that order and Q's dtype (bf16 values), -inf at the padding, so that no tile needs a mask.
    WARP_SPECIALIZE: a producer warpgroup issues the loads and each consumer warpgroup runs 64 query rows on its own,
    so one's softmax overlaps the other's GEMMs (Triton's warp specialization: Hopper and later)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    tl.static_assert(Q_GROUP % BLOCK_M == 0)
    groups = tl.cdiv(lq, Q_GROUP)
    q_desc = tl.make_tensor_descriptor(Q, shape=[n_bh * lq, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(K, shape=[n_bh * lk_pad, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V, shape=[n_bh * lk_pad, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    b_desc = tl.make_tensor_descriptor(BIAS, shape=[n_bh * groups, lk_pad], strides=[lk_pad, 1],
                                       block_shape=[1, BLOCK_N])
    # rows past lq read the next head's queries (or TMA's zeros): computed, never stored
    q = q_desc.load([bh * lq + start_m * BLOCK_M, 0])
    bias_row = bh * groups + start_m * BLOCK_M // Q_GROUP
    row_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + log2_scale
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in tl.range(0, lk_pad, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([bh * lk_pad + start_n, 0])
        s = tl.dot(q, tl.trans(k)) + tl.reshape(b_desc.load([bias_row, start_n]), (1, BLOCK_N)).to(tl.float32)
        pq, row_sum, m_new = _nvfp4_p(s, m_i, row_scale, p_offset, V.dtype.element_ty, BLOCK_M, BLOCK_N, True)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + row_sum
        acc = tl.dot(pq, v_desc.load([bh * lk_pad + start_n, 0]), acc * alpha[:, None])
        m_i = m_new
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    out = acc / l_i[:, None]
    b, h = bh // H, bh % H
    dst = Out + b * lq * H * D + offs_m[:, None] * (H * D) + h * D + offs_d[None, :]
    _store_bf16(dst, _bf16(out), (offs_m < lq)[:, None])


# The kernels: "pointers", `qattn_fwd` (any scheme); for nvfp4 Q.K and P.V with key tiles of a multiple of 64,
# `qattn_nvfp4_fwd`, its operands read by TMA, as one program ("tma") or warp-specialized ("tma_ws").
VARIANTS = ("pointers", "tma", "tma_ws")

# (BLOCK_M, num_warps, num_stages, variant) per (Q.K, P.V) format at head dim 128, in order of preference: the first
# that compiles and passes its check on the device runs (`chosen_config`). The fastest measured at 480p x 81 by
# bench/attention_kernel.py --tune (the tune rows of bench/results/attention_kernel.json as of commit 8e8491a: the
# H200, 2026-12-06; an H100 the same day and the runs of 2026-12-04/05 chose the same, and the H200 on 2026-12-07
# for sage2 and nvfp4: bench/results/attention_kernel_tma_variants.json). nvfp4's first, warp-specialized, needs
# Triton >= 3.7 (3.6's data partitioning takes no tensor of rank above 2): 12.1 ms against 18.6 for the pointer
# kernel's launch on an H100, bit-identical (bench/results/nvfp4_kernel_probe.json), and whole calls 0.95x / 0.96x
# the bf16 call with it (bench/results/eval_speed_attention_triton37.json); with Triton 3.6 the pointer kernel runs.
# Other pairs take their P.V format's (those whose kernel applies); the CPU interpreter takes them too.
CONFIGS = {("int8", "fp16"): ((128, 4, 3, "pointers"),), ("int8", "fp8"): ((64, 4, 3, "pointers"),),
           ("fp8", "fp8"): ((128, 8, 3, "pointers"),),
           ("nvfp4", "nvfp4"): ((128, 4, 2, "tma_ws"), (128, 8, 3, "pointers"))}


def tma_kernel_applies(s: AttentionScheme) -> bool:
    return s.qk == "nvfp4" and s.pv == "nvfp4" and s.block_kv % 64 == 0


# Triton 3.6's warp specialization cannot partition the 5-d view of P's blocks (WSDataPartition: "unsupported op
# type"; 3.7 compiles it): not tried there, rather than failing to compile with a page of IR on stderr.
VARIANT_MIN_TRITON = {"tma_ws": (3, 7)}
TRITON_VERSION = tuple(int(n) for n in re.findall(r"\d+", triton.__version__)[:2])


def kernel_configs(s: AttentionScheme) -> tuple[tuple[int, int, int, str], ...]:
    """The launch configs `s` may run, in CONFIGS' order: its pair's, else its P.V format's first pair's, without
    the variants that cannot run it or that this Triton cannot compile."""
    configs = CONFIGS.get((s.qk, s.pv)) or next(c for (_, pv), c in CONFIGS.items() if pv == s.pv)
    usable = tuple(c for c in configs if (c[3] == "pointers" or tma_kernel_applies(s))
                   and TRITON_VERSION >= VARIANT_MIN_TRITON.get(c[3], (0, 0)))
    return usable or tuple((*c[:3], "pointers") for c in configs[:1])


def key_tiles_apply(s: AttentionScheme) -> bool:
    """Whether the prep can write `s`'s operands in the TMA kernel's key tiles (`kernel_inputs`' key_tiles): the
    kernel applies and Q is not prescaled (that path takes the eager quantizer's operands)."""
    return tma_kernel_applies(s) and not s.q_prescale


def uses_key_tiles(config: tuple, s: AttentionScheme) -> bool:
    """Whether the prep writes `config`'s operands in the TMA kernel's key tiles."""
    return len(config) > 3 and config[3] != "pointers" and key_tiles_apply(s)


def kernel_config(s: AttentionScheme) -> tuple[int, int, int, str]:
    """`kernel_configs`' first: what `launch` runs when given no config."""
    return kernel_configs(s)[0]


# fp8 Q.K on the GPU: 0 reads the codes as fp16 (every e4m3 code exactly, fp32 accumulation); n > 0 runs the fp8
# tensor cores, whose accumulator keeps fewer bits than fp32, and adds every n products to an fp32 one (triton's
# max_num_imprecise_acc). The exponentials amplify the dropped bits: with n = 128 / 64 / 32 the fused path is 5.5e-2
# / 1.9e-1 / 2.7e-2 of the row's largest output from the eager one at worst, against 2**-6 allowed (the H200,
# the fp8_tune rows of bench/results/attention_kernel.json as of commit 8e8491a), so fp8 Q.K stays on fp16 tensor
# cores.
FP8_QK_ACC = 0


def _operand_dtypes(s: AttentionScheme, fp8_qk_acc: int = 0) -> tuple[torch.dtype, torch.dtype]:
    """(Q/K, V) dtypes the GEMMs read: int8 / fp8 codes and bf16 nvfp4 values on the GPU, fp32 under the interpreter
    (exact for every code); fp16 V for fp16 P.V everywhere."""
    if INTERPRET:
        return torch.float32, torch.float16 if s.pv == "fp16" else torch.float32
    native = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "nvfp4": torch.bfloat16, "fp16": torch.float16}
    return torch.float16 if s.qk == "fp8" and not fp8_qk_acc else native[s.qk], native[s.pv]


def key_order(x: torch.Tensor, block_n: int, dim: int, pad: float = 0.0,
              dtype: torch.dtype | None = None, minus: torch.Tensor | None = None) -> torch.Tensor:
    """x (less `minus`, broadcast over the keys, in x's dtype) along its key axis `dim` padded with `pad` to whole
    tiles of block_n (a multiple of 64), every 64 keys in `_tile_keys`' order (column 8j + 2b + e holds key
    16b + 2j + e), contiguous, in `dtype` (default x's): one pass."""
    d = dim % x.ndim
    lk = x.shape[d]
    shape = list(x.shape)
    shape[d] = -(-lk // block_n) * block_n
    dtype = dtype or x.dtype
    out = torch.empty(shape, dtype=dtype, device=x.device)

    def put(dst, src, minus=None):
        dst, src = dst.unflatten(d, (-1, 8, 4, 2)), src.unflatten(d, (-1, 4, 8, 2)).transpose(d + 1, d + 2)
        if minus is None:
            dst.copy_(src)
        else:  # the smoothing's subtraction written straight into place
            torch.sub(src, minus.unflatten(d, (1, 1, 1, 1)), out=dst)

    full = lk // 64 * 64
    put(out.narrow(d, 0, full), x.narrow(d, 0, full), minus)
    if full < lk:  # the last 64 keys, padded
        shape[d] = 64
        tail = torch.full(shape, pad, dtype=dtype, device=x.device)
        rest = x.narrow(d, full, lk - full)
        tail.narrow(d, 0, lk - full).copy_(rest if minus is None else rest - minus)
        put(out.narrow(d, full, 64), tail)
    rest = full + 64 if full < lk else full
    out.narrow(d, rest, out.shape[d] - rest).fill_(pad)
    return out


def bias_layout(bias: torch.Tensor, block_n: int, nvfp4_p: bool) -> torch.Tensor:
    """The scores' bias [B, H, groups, Lk] as the pointer kernel reads it: fp32 (the bf16 values, exact), each row
    padded with zeros to whole key tiles, its columns in `_tile_keys`' order where the kernel permutes the keys (nvfp4 P
    with tiles of a multiple of 64), so that a tile's bias is one contiguous load."""
    if nvfp4_p and block_n % 64 == 0:
        return key_order(bias, block_n, -1, 0.0, torch.float32)
    *lead, lk = bias.shape
    out = torch.empty(*lead, -(-lk // block_n) * block_n, dtype=torch.float32, device=bias.device)
    out[..., :lk] = bias
    out[..., lk:] = 0.0
    return out


def _ensure_allocator() -> None:
    """Device-side TMA descriptors live in a global scratch buffer: torch's caching allocator gives it, unless the
    caller set an allocator of its own."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # another triton layout: set ours
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def tma_operands(ops: dict, s: AttentionScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v, bias) as `qattn_nvfp4_fwd` reads them, from `kernel_inputs`' operands: K, V and the bias in
    `key_order`, the padding's bias -inf (a zero bias where the scheme has none), so that it masks the last tile."""
    if ops.get("key_tiles"):  # the prep wrote them so
        return ops["q"], ops["k"], ops["v"], ops["bias"]
    b, h, lq, _ = ops["q"].shape
    qk_dtype, v_dtype = _operand_dtypes(s)
    q = ops["q"].to(qk_dtype).contiguous()
    k, v = (key_order(ops[n].to(t), s.block_kv, -2) for n, t in (("k", qk_dtype), ("v", v_dtype)))
    bias = ops["bias"]
    if bias is None:
        bias = torch.zeros(b, h, -(-lq // SAGE3_Q_GROUP), ops["k"].shape[2], dtype=qk_dtype, device=q.device)
    return q, k, v, key_order(bias, s.block_kv, -1, float("-inf"), qk_dtype)


def _launch_nvfp4_tma(ops: dict, s: AttentionScheme, block_m: int, warps: int, stages: int,
                      warp_specialize: bool) -> torch.Tensor:
    """`qattn_nvfp4_fwd` over `kernel_inputs`' operands (see `launch`)."""
    b, h, lq, d = ops["q"].shape
    q, k, v, bias = tma_operands(ops, s)
    out = torch.empty(b, lq, h, d, dtype=torch.bfloat16, device=q.device)  # stored through its int16 view
    if not INTERPRET:
        _ensure_allocator()
    qattn_nvfp4_fwd[(fp.triton_cdiv(lq, block_m), b * h)](
        q, k, v, bias, out.view(torch.int16), h, lq, k.shape[2], float(ops["log2_scale"]), float(ops["p_offset"]),
        D=d, BLOCK_M=block_m, BLOCK_N=s.block_kv, Q_GROUP=SAGE3_Q_GROUP, WARP_SPECIALIZE=warp_specialize,
        num_warps=warps, num_stages=stages)
    return out.transpose(1, 2)


def launch(ops: dict, s: AttentionScheme, config: tuple | None = None,
           fp8_qk_acc: int | None = None) -> torch.Tensor:
    """The kernel over `kernel_inputs`' operands: [B, H, Lq, D] bf16 (a view of a [B, Lq, H, D] tensor); config:
    (BLOCK_M, num_warps, num_stages[, variant]), default `kernel_config`'s; fp8_qk_acc: FP8_QK_ACC's choice, default
    FP8_QK_ACC."""
    block_m, warps, stages, *variant = config or kernel_config(s)
    variant = variant[0] if variant else "pointers"
    if variant not in VARIANTS or (variant != "pointers" and not tma_kernel_applies(s)):
        raise ValueError(f"kernel variant {variant!r} does not run {s.qk} Q.K / {s.pv} P.V with {s.block_kv}-key "
                         f"tiles: valid are {', '.join(VARIANTS)} (the last two: nvfp4 / nvfp4, tiles of 64n keys)")
    if variant != "pointers":
        return _launch_nvfp4_tma(ops, s, block_m, warps, stages, variant == "tma_ws")
    if ops.get("key_tiles"):
        raise ValueError("the pointer kernel reads K, V and the bias in key order, not in the TMA kernel's key tiles: "
                         "kernel_inputs(..., key_tiles=False) for it")
    b, h, lq, d = ops["q"].shape
    lk = ops["k"].shape[2]
    fp8_qk_acc = FP8_QK_ACC if fp8_qk_acc is None else fp8_qk_acc
    qk_dtype, v_dtype = _operand_dtypes(s, fp8_qk_acc)
    q, k = (ops[n].to(qk_dtype).contiguous() for n in ("q", "k"))
    v_stride = lk
    if s.pv == "fp8":  # V^T with 16-byte aligned rows: the fp8 tensor cores read both operands K-major
        v = ops["v"].transpose(-1, -2)
        v_stride = v.stride(2)
        if not (v.dtype == v_dtype and v.stride(3) == 1 and v_stride % 16 == 0 and v.stride(1) == d * v_stride
                and v.stride(0) == h * d * v_stride):  # not as kernel_inputs writes it, or the interpreter's fp32
            v_stride = -(-lk // 16) * 16
            v = torch.empty(b, h, d, v_stride, dtype=v_dtype, device=q.device)
            v[..., :lk].copy_(ops["v"].transpose(-1, -2))
    else:
        v = ops["v"].to(v_dtype).contiguous()
    bias = bias_layout(ops["bias"], s.block_kv, PV_CODE[s.pv] == 2) if ops["bias"] is not None else q
    scale = lambda t: t.float().contiguous() if t is not None else q  # noqa: E731
    out = torch.empty(b, lq, h, d, dtype=torch.bfloat16, device=q.device)  # stored through its int16 view
    qattn_fwd[(fp.triton_cdiv(lq, block_m), b * h)](
        q, k, v, scale(ops["qs"]), scale(ops["ks"]), scale(ops["vs"]), bias, out.view(torch.int16), h, lq, lk, v_stride,
        float(ops["log2_scale"]), float(ops["p_offset"]), D=d, BLOCK_M=block_m, BLOCK_N=s.block_kv,
        PV=PV_CODE[s.pv], HAS_QK_SCALE=ops["qs"] is not None, HAS_BIAS=ops["bias"] is not None,
        HAS_V_SCALE=ops["vs"] is not None, QK_INT8=qk_dtype == torch.int8,
        QK_FP8_ACC=fp8_qk_acc if qk_dtype == torch.float8_e4m3fn else 0, NATIVE_FP8=v_dtype == torch.float8_e4m3fn,
        Q_GROUP=SAGE3_Q_GROUP, num_warps=warps, num_stages=stages)
    return out.transpose(1, 2)


def check_inputs(d: int, dtype: torch.dtype, device, seed: int = 0) -> dict[str, tuple]:
    """Adversarial q, k, v [1, 2, L, d]: E2M1's rounding ties, random with a K offset, all-equal keys, one huge
    logit, zero queries, zero values, a sequence that is not a multiple of the tiles, and a large-magnitude one."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 300, d, generator=g)
    k = torch.randn(1, 2, 333, d, generator=g) * 2 + 0.5
    v = torch.randn(1, 2, 333, d, generator=g)
    huge = k.clone()
    huge[:, :, 200] = q[:, :, 0].sign() * 60
    # every 16-value block (along D and along the tokens) a permutation of E2M1's ties and +-6 (scale 1); whole
    # periods of 16 tokens, so that the token means the smoothing subtracts are 0
    ties = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5]).repeat_interleave(2)
    ties = ties * torch.tensor([1.0, -1.0]).repeat(8)
    grid = lambda n: ties[(torch.arange(n)[:, None] + torch.arange(d)[None, :]) % 16].expand(1, 2, n, d)  # noqa: E731
    cases = {"fp4_ties": (grid(288) / 4, grid(320) / 4, grid(320)), "random": (q, k, v),
             "all_equal_keys": (q, k[:, :, :1].expand_as(k), v), "one_huge_logit": (q, huge, v),
             "zero_queries": (torch.zeros_like(q), k, v), "zero_values": (q, k, torch.zeros_like(v)),
             "large": (q * 30, k * 30, v * 1e3)}
    return {name: tuple(t.to(dtype).to(device).contiguous() for t in c) for name, c in cases.items()}


def prep_mismatches(s: AttentionScheme, d: int, dtype: torch.dtype, device) -> list[str]:
    """The prep's codes and scales against the eager quantizer's on `check_inputs`, with q/k/v strided as diffusers
    passes them ([B, L, H, D] memory): "case:operand" for each that is not bit for bit equal; where the TMA kernel
    applies, also the key-tile prep's q, k, v and bias against `tma_operands` of those ("case:operand@key_tiles")."""
    unequal = []
    key_tiles = key_tiles_apply(s)
    for case, qkv in check_inputs(d, dtype, device).items():
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv)
        ops, x = kernel_inputs(q, k, v, s), quantize_inputs(q, k, v, s)
        pairs = (("q", "q"), ("qs", "q_scale"), ("k", "k"), ("ks", "k_scale"), ("v", "v"), ("vs", "v_scale"))
        for mine, eager in pairs:
            got, want = ops[mine], getattr(x, eager)
            if (got is None) != (want is None) or (got is not None and not torch.equal(got.float(), want.float())):
                unequal.append(f"{case}:{mine}")
        if key_tiles:
            tiles = tma_operands(kernel_inputs(q, k, v, s, key_tiles=True), s)
            for name, got, want in zip("q k v bias".split(), tiles, tma_operands(ops, s)):
                if got.dtype != want.dtype or not torch.equal(got, want):
                    unequal.append(f"{case}:{name}@key_tiles")
    return unequal


def compare(s: AttentionScheme, d: int, dtype: torch.dtype, device, config=None,
            fp8_qk_acc: int | None = None) -> tuple[bool, dict]:
    """The fused path (prep and kernel; `launch`'s config and fp8_qk_acc) vs the eager path on `check_inputs`: (within
    TOLERANCE everywhere, the worst relative difference per case)."""
    worst = {}
    for name, (q, k, v) in check_inputs(d, dtype, device).items():
        want = attention_eager(quantize_inputs(q, k, v, s), s, dtype).float()
        got = launch(kernel_inputs(q, k, v, s, uses_key_tiles(config or kernel_config(s), s)), s, config,
                     fp8_qk_acc).float()
        row = want.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        finite = bool(torch.isfinite(got).all()) or bool(torch.equal(torch.isfinite(got), torch.isfinite(want)))
        worst[name] = float(((got - want).abs() / row).nan_to_num(0.0).max()) if finite else "non-finite"
    tolerance = TOLERANCE[s.pv]
    ok = all(isinstance(w, float) and w <= tolerance for w in worst.values())
    return ok, {"max_rel_diff": worst, "tolerance": tolerance}


_CHOSEN: dict[tuple, tuple] = {}  # the fused path's check key -> the launch config that passed


def _choose(key: tuple, s: AttentionScheme, d: int, dtype: torch.dtype, device) -> tuple[bool, dict]:
    """The fused path's check: `kernel_configs` in order, the first that compiles and matches the eager path
    (`compare`) is kept for `key`; why the ones before it were not, in the report (also the ones this Triton is too
    old for: a faster kernel a newer Triton would run)."""
    skipped = {}
    for c in CONFIGS.get((s.qk, s.pv), ()):  # only TMA variants have a minimum Triton
        need = VARIANT_MIN_TRITON.get(c[3], (0, 0))
        if TRITON_VERSION < need and tma_kernel_applies(s):
            skipped[",".join(map(str, c))] = f"needs Triton >= {'.'.join(map(str, need))}, this is {triton.__version__}"
    for config in kernel_configs(s):
        name = ",".join(map(str, config))
        try:
            ok, detail = compare(s, d, dtype, device, config)
        except Exception as e:  # noqa: BLE001 - a variant this Triton or GPU cannot compile or run
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        if ok:
            _CHOSEN[key] = config
            return True, {**detail, "launch_config": list(config), "skipped": skipped}
        skipped[name] = f"outside the tolerance: {detail['max_rel_diff']}"
    return False, {"skipped": skipped}


def _key(s: AttentionScheme, d: int, dtype: torch.dtype, device) -> tuple:
    return ("qattn", torch.device(device).type, s, d, dtype)


def chosen_config(s: AttentionScheme, d: int, dtype: torch.dtype, device) -> tuple | None:
    """The launch config the fused path runs for `s` on `device` (choosing it now if it has not yet), None where no
    config passed its check (the eager path runs)."""
    key = _key(s, d, dtype, device)
    if fp.kernel_ok(key, lambda: _choose(key, s, d, dtype, device)):
        return _CHOSEN[key]
    return None


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionScheme) -> torch.Tensor:
    """The fused path where a launch config passed its check on this device (`chosen_config`), else the eager path;
    q/k/v [B, H, L, D]."""
    d = q.shape[-1]
    if fp.wants_triton(q) and q.dtype == torch.bfloat16 and d in (16, 32, 64, 128, 256):
        key = _key(s, d, q.dtype, q.device)
        out = fp.fast(key, lambda: _choose(key, s, d, q.dtype, q.device),
                      lambda: launch(kernel_inputs(q, k, v, s, uses_key_tiles(_CHOSEN[key], s)), s, _CHOSEN[key]))
        if out is not None:
            return out
    return attention_eager(quantize_inputs(q, k, v, s), s, q.dtype)
