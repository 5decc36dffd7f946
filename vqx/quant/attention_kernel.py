"""The fused path of quantized attention: one Triton flash-attention kernel over the quantized Q, K, V
(vqx.quant.attention.Quantized), which quantizes each tile's P on the fly.

Q, K and V arrive as the GEMMs read them (int8 / fp8 codes or nvfp4 values, all exact in bf16, with fp32
per-token and per-channel scales); on the GPU int8 Q.K runs on int8 tensor cores (as SageAttention), the other
GEMMs in bf16. The kernel's scores are the eager path's (an int8 dot is exact either way); what differs is the order of fp32 accumulation, ``exp2`` (the GPU's approximate ex2), and, for
fp16 P . V, the tile product's fp16 accumulation inside the tensor-core GEMM. `attention_fused` therefore uses
the kernel only after it matched the eager path on adversarial inputs within `TOLERANCE` (once per scheme,
head dim, dtype and device; vqx.quant.fastpath's check registry and report), and falls back to the eager path
otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fastpath as fp
from .attention import AttentionScheme, Quantized, attention_eager, quantize_inputs
from .kernels import INTERPRET, _bf16, _rint, _round_e4m3, _store_bf16

# Fused vs eager, per output row: |difference| <= tolerance(scheme) * the row's largest |eager output|. Measured on
# the H200 (bench/results/attention_kernel.json "checks"): at most 2**-8 where P.V accumulates in fp32 (one bf16
# step of the row's largest value), 7.75e-3 for fp16 P.V (sage1: the tensor cores round the tile's partial sums to
# fp16 as they go, the eager path rounds the tile's sum once); through the CPU interpreter at most 3.3e-3. Allowed:
# twice the measured.
TOLERANCE = {"fp16": 2 ** -6, "fp8": 2 ** -7, "nvfp4": 2 ** -7}
PV_CODE = {"fp16": 0, "fp8": 1, "nvfp4": 2}


@triton.jit
def _round_e2m1(y):
    """|y| onto E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6), ties to even, saturating; y >= 0 here (P)."""
    a = tl.minimum(y, 6.0)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))  # powers of two: exact
    return tl.minimum(_rint(a * inv_step) * step, 6.0)

@triton.jit
def qattn_fwd(Q, K, V, QS, KS, VS, QM, KR, Out, lq, lk, log2_scale, p_offset,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV: tl.constexpr,
              HAS_QK_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V_SCALE: tl.constexpr,
              QK_INT8: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < lq
    q = tl.load(Q + bh * lq * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0)
    if HAS_QK_SCALE:
        qs = tl.load(QS + bh * lq + offs_m, mask=row_ok, other=0.0)
    if HAS_BIAS:
        qm = tl.load(QM + bh * lq * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, lk, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < lk
        kt = tl.load(K + bh * lk * D + cols[None, :] * D + offs_d[:, None], mask=col_ok[None, :], other=0)
        if QK_INT8:  # int8 codes on int8 tensor cores: the exact integer dot, as SageAttention
            s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32)
        else:
            s = tl.dot(q, kt)
        if HAS_QK_SCALE:
            ks = tl.load(KS + bh * lk + cols, mask=col_ok, other=0.0)
            s = s * (qs[:, None] * ks[None, :])
        if HAS_BIAS:
            kr = tl.load(KR + bh * lk * D + cols[None, :] * D + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            s = s + _bf16(tl.dot(qm, kr))  # the eager bias is a bf16 matmul
        s = s * log2_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - (m_new - p_offset)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V + bh * lk * D + cols[:, None] * D + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if PV == 0:  # fp16 P and V, the tile's product accumulated in fp16
            acc += tl.dot(p.to(tl.float16), v, out_dtype=tl.float16).to(tl.float32)
        elif PV == 1:  # fp8 e4m3 P and V codes, exact in the operand dtype
            acc += tl.dot(_round_e4m3(p).to(v.dtype), v)
        else:  # nvfp4 P: 1x16 blocks along the keys, e4m3 block scales
            pb = tl.reshape(p, (BLOCK_M, BLOCK_N // 16, 16))
            sf = _round_e4m3(tl.div_rn(tl.max(pb, 2), 6.0))
            inv = tl.where(sf == 0.0, 0.0, tl.div_rn(tl.full([BLOCK_M, BLOCK_N // 16], 1.0, tl.float32), sf))
            pq = _round_e2m1(pb * inv[:, :, None]) * sf[:, :, None]
            acc += tl.dot(tl.reshape(pq, (BLOCK_M, BLOCK_N)).to(v.dtype), v)
        m_i = m_new
    if HAS_V_SCALE:
        acc = acc * tl.load(VS + bh * D + offs_d)[None, :]
    out = acc / l_i[:, None]
    _store_bf16(Out + bh * lq * D + offs_m[:, None] * D + offs_d[None, :], _bf16(out), row_ok[:, None])


def _launch(x: Quantized, s: AttentionScheme, out_dtype: torch.dtype) -> torch.Tensor:
    b, h, lq, d = x.q.shape
    lk = x.k.shape[2]
    flat = lambda t, dtype: t.reshape(b * h, *t.shape[2:]).to(dtype).contiguous()  # noqa: E731
    # GEMM operands in bf16 (every value is exact in it); fp32 under the interpreter, whose bf16 loads are not exact
    operand = torch.float32 if INTERPRET else torch.bfloat16
    qk_int8 = s.qk == "int8" and not INTERPRET
    q, k = (flat(x.q, torch.int8), flat(x.k, torch.int8)) if qk_int8 else (flat(x.q, operand), flat(x.k, operand))
    v = flat(x.v, torch.float16 if s.pv == "fp16" else operand)
    qs = flat(x.q_scale.squeeze(-1), torch.float32) if x.q_scale is not None else q
    ks = flat(x.k_scale.squeeze(-1), torch.float32) if x.k_scale is not None else q
    vs = flat(x.v_scale.squeeze(2), torch.float32) if x.v_scale is not None else q
    qm = flat(x.q_mean, operand) if x.q_mean is not None else q
    kr = flat(x.k_smoothed, operand) if x.q_mean is not None else q
    out = torch.empty(b * h, lq, d, dtype=torch.bfloat16, device=x.q.device)  # stored through its int16 view
    # nvfp4 holds two more tiles (the smoothed K, Q's means): 128 rows would not fit in shared memory
    block_m = 64 if s.pv == "nvfp4" or d < 64 else 128
    grid = (fp.triton_cdiv(lq, block_m), b * h)
    qattn_fwd[grid](q, k, v, qs, ks, vs, qm, kr, out.view(torch.int16), lq, lk, float(x.log2_scale), float(x.p_offset),
                  D=d, BLOCK_M=block_m, BLOCK_N=s.block_kv, PV=PV_CODE[s.pv], HAS_QK_SCALE=x.q_scale is not None,
                  HAS_BIAS=x.q_mean is not None, HAS_V_SCALE=x.v_scale is not None, QK_INT8=qk_int8,
                  num_warps=4 if d <= 64 else 8, num_stages=3 if s.pv == "fp16" and d <= 128 else 2)
    return out.reshape(b, h, lq, d)


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


def compare(s: AttentionScheme, d: int, dtype: torch.dtype, device) -> tuple[bool, dict]:
    """Fused vs eager on `check_inputs`: (within TOLERANCE everywhere, the worst relative difference per case)."""
    worst = {}
    for name, (q, k, v) in check_inputs(d, dtype, device).items():
        x = quantize_inputs(q, k, v, s)
        want = attention_eager(x, s, dtype).float()
        got = _launch(x, s, dtype).float()
        row = want.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        finite = bool(torch.isfinite(got).all()) or bool(torch.equal(torch.isfinite(got), torch.isfinite(want)))
        worst[name] = float(((got - want).abs() / row).nan_to_num(0.0).max()) if finite else "non-finite"
    tolerance = TOLERANCE[s.pv]
    ok = all(isinstance(w, float) and w <= tolerance for w in worst.values())
    return ok, {"max_rel_diff": worst, "tolerance": tolerance}


def attention_fused(x: Quantized, s: AttentionScheme, out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel where it passed its check on this device, else the eager path."""
    d = x.q.shape[-1]
    if fp.wants_triton(x.q) and out_dtype == torch.bfloat16 and d in (16, 32, 64, 128, 256):
        key = ("qattn", x.q.device.type, s, d, out_dtype)
        out = fp.fast(key, lambda: compare(s, d, out_dtype, x.q.device), lambda: _launch(x, s, out_dtype))
        if out is not None:
            return out
    return attention_eager(x, s, out_dtype)
