"""Quantized attention, emulated: what SageAttention-style kernels compute, in PyTorch ops.

`attention(q, k, v, scheme)` takes q [B, H, Lq, D], k/v [B, H, Lk, D] (any float dtype) and returns the output
in q's dtype. The quantization points follow the kernels' code (thu-ml/SageAttention; the files are named by
each scheme below):

- Q and K are quantized with one scale per group of tokens (per head), symmetric absmax: int8
  (``scale = absmax / 127``), fp8 e4m3 (``absmax / 448``), or NVFP4 (E2M1 in 1x16 blocks along the head dim
  with e4m3 block scales ``e4m3(absmax / 6)``, SageAttention3). K may first be smoothed by its token mean
  (softmax is invariant to it); SageAttention3 also subtracts Q's per-128-token mean and adds ``mean_q . k`` back
  to the scores in fp32.
- The scores are dequantized in fp32 and the softmax runs online over key tiles of ``block_kv`` tokens, as the
  kernels do: a tile's probabilities P are exponentiated against the running row max *after* that tile, and it
  is this unnormalized P that is quantized (fp8: scaled so a row's max is 448; NVFP4: so it is 448 * 6, then
  1x16 microscaled along the keys, each block divided by its unrounded ``absmax / 6`` and dequantized with that
  scale rounded to e4m3, as sageattn3's softmax does; see `quantize_nvfp4_p`). The row sums use P before
  quantization (the kernels sum the fp32 values).
- P . V: fp16 with the tile's product rounded to fp16 (SageAttention1's Triton kernel accumulates each tile in
  fp16 and adds it to an fp32 accumulator); fp8 e4m3 with V scaled per channel (``absmax over tokens / 448``,
  SageAttention2); NVFP4 with V in 1x16 blocks along the tokens (SageAttention3).

What is not emulated: the order of fp32 accumulation inside the tensor-core GEMMs (and Hopper's reduced-precision
fp8 accumulator); the tile loop is evaluated as one sum over tiles weighted by ``exp2(m_tile - m_final)``,
identical in exact arithmetic to the kernels' rescale-as-you-go.

Rounding that surprises: SageAttention's int8 quantizers round half away from zero (``x / s + 0.5 * sign(x)``,
then truncation), not half to even like vqx's linear int8; the per-thread quantizers add 1e-7 to the scale; the
K mean is subtracted in the input dtype (so the smoothed K is rounded to bf16 before quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .numbers import FP8_E4M3_MAX, minifloat_round

LOG2E = 1.44269504  # SageAttention's constant (exp via exp2)
FP8_P_OFFSET = 8.807  # log2(448): SageAttention2 subtracts it from the row max so P spans [0, 448] (S_FP8_OFFSET)
FP4_MAX = 6.0
NVFP4_BLOCK = 16
SAGE3_Q_GROUP = 128  # SageAttention3's per-block Q mean (triton_group_mean's GROUP_SIZE) and its padding

QK_FORMATS = ("int8", "fp8", "nvfp4")
PV_FORMATS = ("fp16", "fp8", "nvfp4")
Q_GRANULARITIES = ("block", "warp", "thread")
K_GRANULARITIES = ("block", "thread")


@dataclass(frozen=True)
class AttentionScheme:
    """How one attention call is quantized (the `attention` config group's numbers)."""

    name: str
    qk: str  # int8 | fp8 | nvfp4
    pv: str  # fp16 | fp8 | nvfp4
    q_granularity: str = "block"  # block: block_q tokens per scale; warp: warp_q; thread: SageAttention2's per-thread
    k_granularity: str = "block"  # block: block_k tokens per scale; thread: 4 scales per block_k tokens
    block_q: int = 128
    warp_q: int = 16
    block_k: int = 64
    block_kv: int = 64  # key tile of the online softmax (the kernel's BLOCK_N / CTA_K)
    smooth_k: bool = True
    smooth_q: bool = False  # SageAttention3: subtract Q's per-128-token mean, add mean_q . k back in fp32
    q_prescale: bool = False  # SageAttention1 (Triton): Q is multiplied by sm_scale * log2(e) before quantizing
    scale_eps: float = 0.0  # added to int8 scales (SageAttention2's per-thread quantizers: 1e-7)

    def __post_init__(self):
        for field, value, valid in (("qk", self.qk, QK_FORMATS), ("pv", self.pv, PV_FORMATS),
                                    ("q_granularity", self.q_granularity, Q_GRANULARITIES),
                                    ("k_granularity", self.k_granularity, K_GRANULARITIES)):
            if value not in valid:
                raise ValueError(f"attention.{field}={value!r} is not valid; valid: {', '.join(valid)}")
        for field in ("block_q", "warp_q", "block_k", "block_kv"):
            if getattr(self, field) < 1:
                raise ValueError(f"attention.{field}={getattr(self, field)} must be >= 1")
        if self.q_granularity == "thread" and self.warp_q % 8:
            raise ValueError(f"attention.warp_q={self.warp_q} must be a multiple of 8 with q_granularity=thread")
        if self.k_granularity == "thread" and self.block_k % 8:
            raise ValueError(f"attention.block_k={self.block_k} must be a multiple of 8 with k_granularity=thread")


# ---- token groups that share a scale ----------------------------------------------------------------------

def group_layout(scheme: AttentionScheme, operand: str) -> tuple[int, int, int]:
    """(R1, G, R2) of Q's or K's scale groups: the tokens repeat in periods of R1 * G * R2, and token
    r1 * G * R2 + g * R2 + r2 of a period is in the period's group g. ``block`` / ``warp``: one group per period.
    Q ``thread``: SageAttention2's per-thread layout, where the tokens of a warp_q-token tile with the same index
    mod 8 share a scale (quant_query_per_thread_int8_kernel). K ``thread``: 4 scales per block_k tokens, token pairs
    interleaved (tokens 8i+2t and 8i+2t+1 share scale t; quant_key_per_thread_int8_kernel)."""
    if operand == "q":
        if scheme.q_granularity == "thread":
            return scheme.warp_q // 8, 8, 1
        return 1, 1, scheme.block_q if scheme.q_granularity == "block" else scheme.warp_q
    if scheme.k_granularity == "thread":
        return scheme.block_k // 8, 4, 2
    return 1, 1, scheme.block_k


def _groups(n: int, layout: tuple[int, int, int], device) -> torch.Tensor:
    r1, g, r2 = layout
    t = torch.arange(n, device=device)
    return (t // (r1 * g * r2)) * g + (t % (g * r2)) // r2


def q_groups(n: int, scheme: AttentionScheme, device=None) -> torch.Tensor:
    """Scale group of each query token (`group_layout`)."""
    return _groups(n, group_layout(scheme, "q"), device)


def k_groups(n: int, scheme: AttentionScheme, device=None) -> torch.Tensor:
    """Scale group of each key token (`group_layout`)."""
    return _groups(n, group_layout(scheme, "k"), device)


def group_max(token_max: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """token_max [B, H, L] (>= 0) -> the max over each token's group, per head, broadcast back to [B, H, L]."""
    n_groups = int(groups.max()) + 1
    out = torch.zeros(*token_max.shape[:2], n_groups, dtype=token_max.dtype, device=token_max.device)
    out.scatter_reduce_(2, groups.expand_as(token_max), token_max, reduce="amax", include_self=True)
    return out.gather(2, groups.expand_as(token_max))


def group_absmax(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] fp32 -> the absmax of each token's group, per head, broadcast back to [B, H, L, 1]."""
    return group_max(x.abs().amax(dim=-1), groups).unsqueeze(-1)


# ---- element quantizers (fp32 in; codes and per-token scales out, or dequantized values) ----------------

def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.trunc(x + 0.5 * torch.where(x >= 0, 1.0, -1.0))


def divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor rounded once (IEEE), on every device: torch multiplies a CUDA tensor by the fp32 reciprocal of a
    Python-number divisor (1 ulp off at times), so the divisor goes in as a tensor; the kernels use div_rn."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def int8_codes(x: torch.Tensor, groups: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SageAttention's int8 quantizer: ``s = absmax / 127 (+ eps)``, codes rounded half away from zero; returns
    (fp32 codes, each token's scale [.., L, 1]). An all-zero group gets codes 0 (the kernel would divide by 0)."""
    scale = divide(group_absmax(x, groups), 127.0) + eps
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(_round_half_away(x / safe), -127.0, 127.0), scale


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of ``x / scale`` as fp32 (round to nearest even, saturating), and the scale."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(x / safe, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float(), scale


def quantize_nvfp4(x: torch.Tensor, dim: int) -> torch.Tensor:
    """SageAttention3's FP4 quantizer along ``dim`` (its length a multiple of 16): per 16 values
    ``sf = e4m3(absmax / 6)``, codes ``e2m1(x * (1 / sf))`` (the kernel multiplies by the reciprocal),
    saturating; no global scale. Returns the dequantized values (exact in bf16: 2 + 4 significant bits)."""
    x = x.movedim(dim, -1)
    blocks = x.unflatten(-1, (-1, NVFP4_BLOCK))
    # the kernel's __nv_fp8_e4m3 conversion saturates at 448 (blocks above 6 * 448 clip); torch's CUDA cast gives NaN
    sf = divide(blocks.abs().amax(dim=-1, keepdim=True), FP4_MAX)
    sf = torch.clamp(sf, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    inv = torch.where(sf == 0, torch.zeros_like(sf), 1.0 / sf)
    codes = minifloat_round(blocks * inv, 2, 1)
    return (codes * sf).flatten(-2).movedim(-1, dim)


def quantize_nvfp4_p(p: torch.Tensor) -> torch.Tensor:
    """SageAttention3's P quantizer, along the last dim (a multiple of 16): per 16 values ``a = absmax / 6`` in
    fp32, codes ``e2m1(p / a)`` (so the block's largest value is code 6), dequantized with ``e4m3(a)``.
    sageattn3's softmax_fused.h computes ``a`` (AbsMaxP) and divides P by it unrounded; only the scale it hands
    the block-scaled MMA is rounded to e4m3 (mainloop_tma_ws.h's quantize): unlike Q, K and V
    (`quantize_nvfp4`), P's codes are not relative to the rounded scale. p >= 0; blocks of zeros give zeros."""
    blocks = p.float().unflatten(-1, (-1, NVFP4_BLOCK))
    a = divide(blocks.amax(dim=-1, keepdim=True), FP4_MAX)
    codes = minifloat_round(blocks / torch.where(a > 0, a, 1.0), 2, 1)  # a == 0: a block of zeros
    sf = torch.clamp(a, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()  # cvt.rn.satfinite
    return (codes * sf).flatten(-2)


def _pad_tokens(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[2]) % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


# ---- the attention ---------------------------------------------------------------------------------------

@dataclass
class Quantized:
    """Q, K and V as the kernels' GEMMs read them, fp32: int8 / fp8 codes with per-token (Q, K) or per-channel (V)
    scales, or dequantized values (nvfp4, fp16) with no scale; every value is exact in bf16."""

    q: torch.Tensor  # [B, H, Lq, D]
    q_scale: torch.Tensor | None  # [B, H, Lq, 1]
    k: torch.Tensor  # [B, H, Lk, D]
    k_scale: torch.Tensor | None  # [B, H, Lk, 1]
    v: torch.Tensor  # [B, H, Lk, D]
    v_scale: torch.Tensor | None  # [B, H, 1, D]
    q_mean: torch.Tensor | None  # SageAttention3: each query's group mean [B, H, Lq, D] (input dtype) ...
    k_smoothed: torch.Tensor | None  # ... and the smoothed K (input dtype): scores get q_mean . k_smoothed
    log2_scale: float  # scores -> log2 units
    p_offset: float  # log2 of P's row max (`p_log2_offset`)


def smoothing_means(q: torch.Tensor, k: torch.Tensor, s: AttentionScheme):
    """(K's token mean [B, H, 1, D], Q's per-128-token means [B, H, groups, D]), each None where `s` does not smooth,
    in the input dtype (means of fp32 sums): SageAttention's K smoothing, SageAttention3's Q smoothing (Q padded to
    128 tokens with zeros, the pads counted in the last group's mean)."""
    k_mean = k.mean(dim=2, keepdim=True) if s.smooth_k else None
    q_mean = None
    if s.smooth_q:
        lq = q.shape[2]
        full = lq // SAGE3_Q_GROUP * SAGE3_Q_GROUP
        sums = q[:, :, :full].unflatten(2, (-1, SAGE3_Q_GROUP)).sum(dim=3, dtype=torch.float32)
        if full < lq:
            sums = torch.cat([sums, q[:, :, full:].sum(dim=2, keepdim=True, dtype=torch.float32)], dim=2)
        q_mean = (sums / SAGE3_Q_GROUP).to(q.dtype)
    return k_mean, q_mean


def smooth_qk(q: torch.Tensor, k: torch.Tensor, s: AttentionScheme):
    """(Q, K, each query's group mean [B, H, Lq, D] or None): Q and K less their `smoothing_means`, in the input
    dtype as the kernels subtract them."""
    k_mean, q_mean = smoothing_means(q, k, s)
    if k_mean is not None:
        k = k - k_mean
    if q_mean is not None:
        q_mean = q_mean.repeat_interleave(SAGE3_Q_GROUP, dim=2)[:, :, :q.shape[2]]
        q = q - q_mean
    return q, k, q_mean


def quantize_qk(q: torch.Tensor, k: torch.Tensor, s: AttentionScheme):
    """(Q, its per-token scales, K, its scales, Q's group means, the smoothed K): Q's codes with q_prescale
    already carry sm_scale * log2(e)."""
    d = q.shape[-1]
    q, k, q_mean = smooth_qk(q, k, s)
    qf, kf = q.float(), k.float()
    if s.q_prescale:
        qf = qf * ((d ** -0.5) * LOG2E)
    if s.qk == "int8":
        qc, qs = int8_codes(qf, q_groups(qf.shape[2], s, qf.device), s.scale_eps)
        kc, ks = int8_codes(kf, k_groups(kf.shape[2], s, kf.device), s.scale_eps)
    elif s.qk == "fp8":
        qc, qs = fp8_codes(qf, divide(group_absmax(qf, q_groups(qf.shape[2], s, qf.device)), FP8_E4M3_MAX))
        kc, ks = fp8_codes(kf, divide(group_absmax(kf, k_groups(kf.shape[2], s, kf.device)), FP8_E4M3_MAX))
    else:
        if d % NVFP4_BLOCK:
            raise ValueError(f"attention nvfp4 needs a head dim that is a multiple of 16, not {d}")
        (qc, qs), (kc, ks) = (quantize_nvfp4(qf, -1), None), (quantize_nvfp4(kf, -1), None)
    return qc, qs, kc, ks, q_mean, (k if q_mean is not None else None)


def quantize_v(v: torch.Tensor, s: AttentionScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """V as the P . V GEMM reads it: (fp32 values or codes, per-channel scale or None)."""
    vf = v.float()
    if s.pv == "fp16":
        return v.half().float(), None
    if s.pv == "fp8":  # per channel over the tokens (per_channel_fp8, scale_max 448)
        return fp8_codes(vf, divide(vf.abs().amax(dim=2, keepdim=True), FP8_E4M3_MAX))
    return quantize_nvfp4(_pad_tokens(vf, NVFP4_BLOCK), 2)[:, :, :vf.shape[2]], None


def quantize_p(p: torch.Tensor, s: AttentionScheme) -> torch.Tensor:
    """A tile's unnormalized probabilities [.., Lq, tile] (max 448 for fp8, 2688 for nvfp4) as P . V reads them."""
    if s.pv == "fp16":
        return p.half().float()
    if s.pv == "fp8":
        return torch.clamp(p, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    return quantize_nvfp4_p(p)


def p_log2_offset(s: AttentionScheme) -> float:
    """log2 of the value a row's max maps to in P: 448 (fp8), 448 * 6 (nvfp4), 1 (fp16)."""
    if s.pv == "fp8":
        return FP8_P_OFFSET
    if s.pv == "nvfp4":
        return math.log2(FP8_E4M3_MAX * FP4_MAX)
    return 0.0


def quantize_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: AttentionScheme) -> Quantized:
    qc, qs, kc, ks, q_mean, k_smoothed = quantize_qk(q, k, s)
    vc, vs = quantize_v(v, s)
    log2_scale = 1.0 if s.q_prescale else (q.shape[-1] ** -0.5) * LOG2E
    return Quantized(qc, qs, kc, ks, vc, vs, q_mean, k_smoothed, log2_scale, p_log2_offset(s))


def scores(x: Quantized, rows: slice) -> torch.Tensor:
    """fp32 scores of the query rows, in log2 units: ``dot(q, k) * k_scale * (q_scale * log2_scale)`` (the integer
    dot is exact in fp32; SageAttention too folds the softmax scale into q_scale, and the kernel scales each row
    once); with SageAttention3's ``q_mean . k`` (computed in the input dtype, as its torch.matmul),
    ``(dot(q, k) * (q_scale * k_scale) + q_mean . k) * log2_scale``."""
    out = torch.matmul(x.q[:, :, rows], x.k.transpose(-1, -2))
    if x.q_mean is None:
        if x.q_scale is None:
            return out * x.log2_scale
        return out * x.k_scale.transpose(-1, -2) * (x.q_scale[:, :, rows] * x.log2_scale)
    if x.q_scale is not None:
        out = out * (x.q_scale[:, :, rows] * x.k_scale.transpose(-1, -2))
    out = out + torch.matmul(x.q_mean[:, :, rows], x.k_smoothed.transpose(-1, -2)).float()
    return out * x.log2_scale


def attention_eager(x: Quantized, s: AttentionScheme, out_dtype: torch.dtype, q_chunk: int = 1024) -> torch.Tensor:
    """The online softmax over ``block_kv`` key tiles, queries ``q_chunk`` rows at a time (module doc)."""
    lq, lk = x.q.shape[2], x.k.shape[2]
    tile = s.block_kv
    n_tiles = -(-lk // tile)
    pad = n_tiles * tile - lk
    vt = torch.nn.functional.pad(x.v, (0, 0, 0, pad)).unflatten(2, (n_tiles, tile))  # [B, H, tiles, tile, D]
    out = torch.empty(*x.q.shape[:3], x.v.shape[-1], dtype=out_dtype, device=x.q.device)
    for start in range(0, lq, q_chunk):
        rows = slice(start, start + q_chunk)
        sc = torch.nn.functional.pad(scores(x, rows), (0, pad), value=-math.inf).unflatten(-1, (n_tiles, tile))
        m_run = torch.cummax(sc.amax(dim=-1), dim=-1).values  # running row max after each tile
        p = torch.exp2(sc - (m_run - x.p_offset).unsqueeze(-1))  # [B, H, rows, tiles, tile]
        row_sum_tile = p.sum(dim=-1)
        pq = quantize_p(p, s)
        weight = torch.exp2(m_run - m_run[..., -1:])  # each tile's rescale to the final max
        if s.pv == "fp16":  # each tile's product rounded to fp16 before the fp32 accumulator
            part = torch.einsum("bhqtk,bhtkd->bhqtd", pq, vt).half().float()
            acc = (part * weight.unsqueeze(-1)).sum(dim=3)
        else:
            acc = torch.matmul((pq * weight.unsqueeze(-1)).flatten(-2), vt.flatten(2, 3))
        if x.v_scale is not None:
            acc = acc * x.v_scale
        total = (row_sum_tile * weight).sum(dim=-1, keepdim=True)
        out[:, :, rows] = (acc / total).to(out_dtype)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: AttentionScheme,
              impl: str = "auto") -> torch.Tensor:
    """Emulated quantized attention (module doc); q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D] in q's
    dtype. ``impl``: "eager" (PyTorch ops), "auto" (on CUDA bf16, the Triton kernel of vqx.quant.attention_kernel
    where it passed its check; VQX_QUANT_IMPL=eager turns it off), else eager."""
    if impl == "auto" and q.is_cuda:
        from .attention_kernel import attention_fused

        return attention_fused(q, k, v, scheme)
    return attention_eager(quantize_inputs(q, k, v, scheme), scheme, q.dtype)
