"""The fused path of quantized attention: a Triton pass that quantizes Q, K and V as the GEMMs read them, then one
Triton flash-attention kernel over them, which quantizes each tile's P on the fly.

The prep (`kernel_inputs`) gives the eager path's codes and scales bit for bit (vqx.quant.attention.quantize_inputs;
tests/test_attention.py checks it): per-token absmax from one pass over the bf16 input, the group maxima and scales
with the eager path's own ops on those small tensors, then one pass that writes int8 / fp8 codes. nvfp4 (and Q
smoothing) is prepared by the eager path. On the GPU the GEMMs read the operands natively: int8 Q.K on int8 tensor
cores, fp8 e4m3 P.V on fp8 ones (P converted with cvt.rn.satfinite, the eager path's rounding; V transposed so
both operands are K-major, as SageAttention2 lays it out), fp8 Q.K codes as fp16 (exact; see `_operand_dtypes`),
fp16 P.V accumulated in fp16 per tile (SageAttention1), nvfp4 values in bf16. The output is written as [B, Lq, H, D], the
layout Wan's output projection reads. What differs from the eager path is the order of fp32 accumulation, ``exp2``
(the GPU's approximate ex2) and the tile products' accumulation inside the tensor cores (fp16 for fp16 P.V;
Hopper's fp8 accumulator keeps fewer bits than fp32, each tile's product added to the fp32 accumulator on its own,
as SageAttention2 does). `attention_fused` therefore uses the kernel only after it matched the eager path on
adversarial inputs within `TOLERANCE` (once per scheme, head dim, dtype and device; vqx.quant.fastpath's check
registry and report), and falls back to the eager path otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fastpath as fp
from .attention import (FP8_E4M3_MAX, LOG2E, AttentionScheme, attention_eager, group_max, k_groups, p_log2_offset,
                        q_groups, quantize_inputs)
from .kernels import INTERPRET, _bf16, _fp8_codes, _load_bf16, _rint, _round_e4m3, _store_bf16

# Fused vs eager, per output row: |difference| <= tolerance(scheme) * the row's largest |eager output|. Measured on
# the H200 (bench/results/attention_kernel.json "checks"): at most 1.9e-3 for nvfp4 (bf16 values, fp32 accumulation),
# 7.75e-3 for fp16 P.V (sage1: the tensor cores round the tile's partial sums to fp16 as they go, the eager path rounds
# the tile's sum once) and for fp8 P.V (Hopper's fp8 accumulator); one bf16 step of the row's largest value is
# 3.9e-3 to 7.8e-3; through the CPU interpreter at most 3.3e-3. Allowed: about twice the measured.
TOLERANCE = {"fp16": 2 ** -6, "fp8": 2 ** -6, "nvfp4": 2 ** -7}
PV_CODE = {"fp16": 0, "fp8": 1, "nvfp4": 2}
QUANT_CODE = {"int8": 0, "fp8": 1}


@triton.jit
def _round_e2m1(y):
    """|y| onto E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6), ties to even, saturating; y >= 0 here (P)."""
    a = tl.minimum(y, 6.0)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))  # powers of two: exact
    return tl.minimum(_rint(a * inv_step) * step, 6.0)


# ---- the prep: Q, K, V [B, H, L, D] (bf16, any strides with D contiguous) -> codes [B, H, L, D] contiguous ----

@triton.jit
def _load_tokens(X, MEAN, bh, H, rows, offs_d, L, sx_b, sx_h, sx_l, prescale, D: tl.constexpr,
                 HAS_MEAN: tl.constexpr, PRESCALE: tl.constexpr):
    """The values the eager quantizer sees: bf16 input, minus K's token mean in bf16 (``k - k.mean``), times Q's
    prescale in fp32."""
    ok = rows < L
    x = _load_bf16(X + (bh // H) * sx_b + (bh % H) * sx_h + rows[:, None] * sx_l + offs_d[None, :], ok[:, None])
    if HAS_MEAN:
        x = _bf16(x - _load_bf16(MEAN + bh * D + offs_d, offs_d < D)[None, :])
    if PRESCALE:
        x = x * prescale
    return x


@triton.jit
def token_absmax(X, MEAN, Out, H, L, sx_b, sx_h, sx_l, prescale, D: tl.constexpr, BLOCK_L: tl.constexpr,
                 HAS_MEAN: tl.constexpr, PRESCALE: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    x = _load_tokens(X, MEAN, bh, H, rows, tl.arange(0, D), L, sx_b, sx_h, sx_l, prescale, D, HAS_MEAN, PRESCALE)
    tl.store(Out + bh * L + rows, tl.max(tl.abs(x), 1), mask=rows < L)


@triton.jit
def quantize_tokens(X, MEAN, S, Out, H, L, sx_b, sx_h, sx_l, prescale, D: tl.constexpr, BLOCK_L: tl.constexpr,
                    HAS_MEAN: tl.constexpr, PRESCALE: tl.constexpr, GRID: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """Codes of x / scale: int8 rounded half away from zero and clamped to 127 (GRID 0, SageAttention's quantizer),
    e4m3 bits (GRID 1); a zero scale divides by 1, as the eager path."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    ok = rows < L
    x = _load_tokens(X, MEAN, bh, H, rows, offs_d, L, sx_b, sx_h, sx_l, prescale, D, HAS_MEAN, PRESCALE)
    if PER_CHANNEL:
        s = tl.load(S + bh * D + offs_d)[None, :]
    else:
        s = tl.load(S + bh * L + rows, mask=ok, other=1.0)[:, None]
    y = tl.div_rn(x, tl.where(s == 0.0, 1.0, s))
    dst = Out + bh * L * D + rows[:, None] * D + offs_d[None, :]
    if GRID == 0:
        c = (y + tl.where(y >= 0.0, 0.5, -0.5)).to(tl.int32)  # the conversion truncates toward zero
        tl.store(dst, tl.minimum(tl.maximum(c, -127), 127).to(tl.int8), mask=ok[:, None])
    else:
        tl.store(dst, _fp8_codes(y), mask=ok[:, None])


def _quantize(x: torch.Tensor, grid: str, groups: torch.Tensor | None, eps: float, mean: torch.Tensor | None = None,
              prescale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] bf16 -> (codes [B, H, L, D] int8 / float8_e4m3fn, scales [B, H, L, 1] per token or, with
    groups None, [B, H, 1, D] per channel), equal to the eager quantizer's."""
    b, h, n, d = x.shape
    assert x.stride(3) == 1
    block_l = max(1, min(64, 8192 // d))
    grid_ = (fp.triton_cdiv(n, block_l), b * h)
    strides = (x.stride(0), x.stride(1), x.stride(2))
    xi = x.view(torch.int16)
    mi = mean.contiguous().view(torch.int16) if mean is not None else xi
    flags = dict(D=d, BLOCK_L=block_l, HAS_MEAN=mean is not None, PRESCALE=prescale is not None)
    pre = float(prescale) if prescale is not None else 1.0
    limit = 127.0 if grid == "int8" else FP8_E4M3_MAX
    if groups is None:  # V: per channel over the tokens, as quantize_v
        scale = (x.abs().amax(dim=2, keepdim=True).float() / limit).contiguous()
    else:
        tok = torch.empty(b, h, n, dtype=torch.float32, device=x.device)
        token_absmax[grid_](xi, mi, tok, h, n, *strides, pre, **flags)
        scale = group_max(tok, groups).unsqueeze(-1) / limit
        if grid == "int8":  # as int8_codes (fp8 has no eps)
            scale = scale + eps
    codes = torch.empty(b, h, n, d, dtype=torch.int8 if grid == "int8" else torch.float8_e4m3fn, device=x.device)
    out = codes if grid == "int8" else codes.view(torch.uint8)
    quantize_tokens[grid_](xi, mi, scale, out, h, n, *strides, pre, GRID=QUANT_CODE[grid], PER_CHANNEL=groups is None,
                           **flags)
    return codes, scale


def kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionScheme) -> dict:
    """The kernel's operands for bf16 q, k, v [B, H, L, D]: codes and fp32 scales (int8 / fp8 Q.K and fp16 / fp8
    P.V, prepared here), or the eager path's values (nvfp4)."""
    d = q.shape[-1]
    log2_scale = 1.0 if s.q_prescale else (d ** -0.5) * LOG2E
    if s.qk == "nvfp4" or s.pv == "nvfp4" or s.smooth_q:
        x = quantize_inputs(q, k, v, s)
        return dict(q=x.q, qs=x.q_scale, k=x.k, ks=x.k_scale, v=x.v, vs=x.v_scale, qm=x.q_mean, kr=x.k_smoothed,
                    log2_scale=x.log2_scale, p_offset=x.p_offset)
    mean = k.mean(dim=2, keepdim=True) if s.smooth_k else None
    qc, qs = _quantize(q, s.qk, q_groups(q.shape[2], s, q.device), s.scale_eps,
                       prescale=(d ** -0.5) * LOG2E if s.q_prescale else None)
    kc, ks = _quantize(k, s.qk, k_groups(k.shape[2], s, k.device), s.scale_eps, mean=mean)
    if s.pv == "fp16":
        vc, vs = torch.empty(v.shape, dtype=torch.float16, device=v.device).copy_(v), None
    else:
        vc, vs = _quantize(v, "fp8", None, 0.0)
    return dict(q=qc, qs=qs, k=kc, ks=ks, v=vc, vs=vs, qm=None, kr=None, log2_scale=log2_scale,
                p_offset=p_log2_offset(s))


# ---- the attention ------------------------------------------------------------------------------------------

@triton.jit
def _tile(acc, l_i, m_i, q, qs, qm, K, KS, KR, V, V_STRIDE, start_n, lk, log2_scale, p_offset, offs_n, offs_d,
          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV: tl.constexpr,
          HAS_QK_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, QK_INT8: tl.constexpr, NATIVE_FP8: tl.constexpr,
          MASK: tl.constexpr):
    """One key tile of the online softmax; MASK: the tile runs past lk (only the last one)."""
    cols = start_n + offs_n
    if MASK:
        col_ok = cols < lk
        k = tl.load(K + cols[:, None] * D + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(K + cols[:, None] * D + offs_d[None, :])
    if QK_INT8:  # int8 codes on int8 tensor cores: the exact integer dot, as SageAttention
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    else:
        s = tl.dot(q, tl.trans(k))
    if HAS_QK_SCALE:
        if MASK:
            ks = tl.load(KS + cols, mask=col_ok, other=0.0)
        else:
            ks = tl.load(KS + cols)
        s = s * (qs[:, None] * ks[None, :])
    if HAS_BIAS:
        kr = tl.load(KR + cols[None, :] * D + offs_d[:, None], mask=cols[None, :] < lk, other=0.0)
        s = s + _bf16(tl.dot(qm, kr))  # the eager bias is a bf16 matmul
    s = s * log2_scale
    if MASK:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - (m_new - p_offset)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
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
        pb = tl.reshape(p, (BLOCK_M, BLOCK_N // 16, 16))
        sf = _round_e4m3(tl.div_rn(tl.max(pb, 2), 6.0))
        inv = tl.where(sf == 0.0, 0.0, tl.div_rn(tl.full([BLOCK_M, BLOCK_N // 16], 1.0, tl.float32), sf))
        pq = _round_e2m1(pb * inv[:, :, None]) * sf[:, :, None]
        acc += tl.dot(tl.reshape(pq, (BLOCK_M, BLOCK_N)).to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def qattn_fwd(Q, K, V, QS, KS, VS, QM, KR, Out, H, lq, lk, v_stride, log2_scale, p_offset,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV: tl.constexpr,
              HAS_QK_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V_SCALE: tl.constexpr,
              QK_INT8: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """Out [B, Lq, H, D] (the layout Wan's output projection reads) from q [B*H, Lq, D], k [B*H, Lk, D] and v
    [B*H, Lk, D] or, for fp8 P.V, v^T [B*H, D, v_stride]."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < lq
    q = tl.load(Q + bh * lq * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    qs = tl.zeros([BLOCK_M], dtype=tl.float32)
    qm = q
    if HAS_QK_SCALE:
        qs = tl.load(QS + bh * lq + offs_m, mask=row_ok, other=0.0)
    if HAS_BIAS:
        qm = tl.load(QM + bh * lq * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    K += bh * lk * D
    if PV == 1:
        V += bh * v_stride * D
    else:
        V += bh * lk * D
    KS += bh * lk
    KR += bh * lk * D
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    full = (lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, qs, qm, K, KS, KR, V, v_stride, start_n, lk, log2_scale, p_offset, offs_n,
                              offs_d, D, BLOCK_M, BLOCK_N, PV, HAS_QK_SCALE, HAS_BIAS, QK_INT8, NATIVE_FP8, False)
    if full < lk:
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, qs, qm, K, KS, KR, V, v_stride, full, lk, log2_scale, p_offset, offs_n,
                              offs_d, D, BLOCK_M, BLOCK_N, PV, HAS_QK_SCALE, HAS_BIAS, QK_INT8, NATIVE_FP8, True)
    if HAS_V_SCALE:
        acc = acc * tl.load(VS + bh * D + offs_d)[None, :]
    out = acc / l_i[:, None]
    b, h = bh // H, bh % H
    dst = Out + b * lq * H * D + offs_m[:, None] * (H * D) + h * D + offs_d[None, :]
    _store_bf16(dst, _bf16(out), row_ok[:, None])


# (BLOCK_M, num_warps, num_stages) per (Q.K, P.V) format at head dim 128, the fastest measured on the H200 at
# 480p x 81 (bench/attention_kernel.py --tune: bench/results/attention_kernel_tune.json); other pairs take their P.V
# format's; the CPU interpreter takes them too. 128 x 128 nvfp4 tiles need more shared memory than the H200 has.
CONFIGS = {("int8", "fp16"): (128, 4, 3), ("int8", "fp8"): (64, 4, 3), ("fp8", "fp8"): (128, 8, 3),
           ("nvfp4", "nvfp4"): (64, 4, 2)}


def kernel_config(s: AttentionScheme) -> tuple[int, int, int]:
    """The launch config of `s`: its pair's in CONFIGS, else the first listed with its P.V format."""
    return CONFIGS.get((s.qk, s.pv)) or next(c for (_, pv), c in CONFIGS.items() if pv == s.pv)


def _operand_dtypes(s: AttentionScheme) -> tuple[torch.dtype, torch.dtype]:
    """(Q/K, V) dtypes the GEMMs read: int8 / fp8 codes and bf16 nvfp4 values on the GPU, fp32 under the interpreter
    (exact for every code); fp16 V for fp16 P.V everywhere."""
    if INTERPRET:
        return torch.float32, torch.float16 if s.pv == "fp16" else torch.float32
    native = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "nvfp4": torch.bfloat16, "fp16": torch.float16}
    # fp8 Q.K as fp16 (every e4m3 code exactly): Hopper's fp8 accumulator drops bits within the 128-long dot, which
    # the exponentials amplify (5.5e-2 of the row's largest output measured on the H200, against 2**-7 allowed)
    qk = torch.float16 if s.qk == "fp8" else native[s.qk]
    return qk, native[s.pv]


def launch(ops: dict, s: AttentionScheme, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The kernel over `kernel_inputs`' operands: [B, H, Lq, D] bf16 (a view of a [B, Lq, H, D] tensor)."""
    b, h, lq, d = ops["q"].shape
    lk = ops["k"].shape[2]
    qk_dtype, v_dtype = _operand_dtypes(s)
    q, k = (ops[n].to(qk_dtype).contiguous() for n in ("q", "k"))
    v_stride = lk
    if s.pv == "fp8":  # V^T with 16-byte aligned rows: the fp8 tensor cores read both operands K-major
        v_stride = -(-lk // 16) * 16
        v = torch.empty(b, h, d, v_stride, dtype=v_dtype, device=q.device)
        v[..., :lk].copy_(ops["v"].transpose(-1, -2))
    else:
        v = ops["v"].to(v_dtype).contiguous()
    bias = torch.float32 if INTERPRET else torch.bfloat16
    qm = ops["qm"].to(bias).contiguous() if ops["qm"] is not None else q
    kr = ops["kr"].to(bias).contiguous() if ops["kr"] is not None else q
    scale = lambda t: t.float().contiguous() if t is not None else q  # noqa: E731
    out = torch.empty(b, lq, h, d, dtype=torch.bfloat16, device=q.device)  # stored through its int16 view
    block_m, warps, stages = config or kernel_config(s)
    qattn_fwd[(fp.triton_cdiv(lq, block_m), b * h)](
        q, k, v, scale(ops["qs"]), scale(ops["ks"]), scale(ops["vs"]), qm, kr, out.view(torch.int16), h, lq, lk, v_stride,
        float(ops["log2_scale"]), float(ops["p_offset"]), D=d, BLOCK_M=block_m, BLOCK_N=s.block_kv,
        PV=PV_CODE[s.pv], HAS_QK_SCALE=ops["qs"] is not None, HAS_BIAS=ops["qm"] is not None,
        HAS_V_SCALE=ops["vs"] is not None, QK_INT8=qk_dtype == torch.int8, NATIVE_FP8=v_dtype == torch.float8_e4m3fn,
        num_warps=warps, num_stages=stages)
    return out.transpose(1, 2)


def check_inputs(d: int, dtype: torch.dtype, device, seed: int = 0) -> dict[str, tuple]:
    """Adversarial q, k, v [1, 2, L, d]: random with a K offset, all-equal keys, one huge logit, zero queries,
    zero values, a sequence that is not a multiple of the tiles, and a large-magnitude one."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 300, d, generator=g)
    k = torch.randn(1, 2, 333, d, generator=g) * 2 + 0.5
    v = torch.randn(1, 2, 333, d, generator=g)
    huge = k.clone()
    huge[:, :, 200] = q[:, :, 0].sign() * 60
    cases = {"random": (q, k, v), "all_equal_keys": (q, k[:, :, :1].expand_as(k), v), "one_huge_logit": (q, huge, v),
             "zero_queries": (torch.zeros_like(q), k, v), "zero_values": (q, k, torch.zeros_like(v)),
             "large": (q * 30, k * 30, v * 1e3)}
    return {name: tuple(t.to(dtype).to(device).contiguous() for t in c) for name, c in cases.items()}


def compare(s: AttentionScheme, d: int, dtype: torch.dtype, device, config=None) -> tuple[bool, dict]:
    """The fused path (prep and kernel) vs the eager path on `check_inputs`: (within TOLERANCE everywhere, the worst
    relative difference per case)."""
    worst = {}
    for name, (q, k, v) in check_inputs(d, dtype, device).items():
        want = attention_eager(quantize_inputs(q, k, v, s), s, dtype).float()
        got = launch(kernel_inputs(q, k, v, s), s, config).float()
        row = want.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        finite = bool(torch.isfinite(got).all()) or bool(torch.equal(torch.isfinite(got), torch.isfinite(want)))
        worst[name] = float(((got - want).abs() / row).nan_to_num(0.0).max()) if finite else "non-finite"
    tolerance = TOLERANCE[s.pv]
    ok = all(isinstance(w, float) and w <= tolerance for w in worst.values())
    return ok, {"max_rel_diff": worst, "tolerance": tolerance}


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionScheme) -> torch.Tensor:
    """The fused path where it passed its check on this device, else the eager path; q/k/v [B, H, L, D]."""
    d = q.shape[-1]
    if fp.wants_triton(q) and q.dtype == torch.bfloat16 and d in (16, 32, 64, 128, 256):
        key = ("qattn", q.device.type, s, d, q.dtype)
        out = fp.fast(key, lambda: compare(s, d, q.dtype, q.device), lambda: launch(kernel_inputs(q, k, v, s), s))
        if out is not None:
            return out
    return attention_eager(quantize_inputs(q, k, v, s), s, q.dtype)
