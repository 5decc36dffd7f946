"""A slow, readable quantized attention, written from the SageAttention kernels' code independently of
vqx.quant.attention: explicit loops over heads, scale groups, 16-value blocks and key tiles, a table for E2M1,
and the online softmax the kernels run (running max, rescaled accumulator)."""

from __future__ import annotations

import math

import torch

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # index parity = mantissa bit


def e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even code, saturating at 6."""
    mag = x.abs().clamp(max=6.0)
    dist = (mag.unsqueeze(-1) - E2M1).abs()
    best = dist.min(dim=-1, keepdim=True).values
    ties = dist == best
    # among equally near codes take the even index
    index = torch.where(ties & (torch.arange(8) % 2 == 0), torch.arange(8), 99).min(dim=-1).values
    index = torch.where(index == 99, dist.argmin(dim=-1), index)
    return torch.sign(x) * E2M1[index]


def nvfp4_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of x [N, C] (C a multiple of 16) in 1x16 blocks: sf = e4m3(absmax / 6), x * (1 / sf) to E2M1."""
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 16):
            blk = x[r, c:c + 16]
            sf = float((blk.abs().max() / 6.0).clamp(max=448.0).to(torch.float8_e4m3fn).float())  # satfinite
            out[r, c:c + 16] = 0.0 if sf == 0 else e2m1(blk * (1.0 / sf)) * sf
    return out


def nvfp4_p_rows(p: torch.Tensor) -> torch.Tensor:
    """P [N, C] >= 0 in 1x16 blocks as sageattn3's softmax quantizes it: a = absmax / 6 (fp32, not rounded),
    e2m1(p / a), times e4m3(a)."""
    out = torch.zeros_like(p)
    for r in range(p.shape[0]):
        for c in range(0, p.shape[1], 16):
            blk = p[r, c:c + 16]
            a = blk.max() / torch.tensor(6.0)
            if a > 0:
                sf = float(a.clamp(max=448.0).to(torch.float8_e4m3fn).float())
                out[r, c:c + 16] = e2m1(blk / a) * sf
    return out


def token_groups(n: int, granularity: str, block: int, warp: int, role: str) -> list[list[int]]:
    groups = []
    if granularity == "block":
        groups = [list(range(s, min(s + block, n))) for s in range(0, n, block)]
    elif granularity == "warp":
        groups = [list(range(s, min(s + warp, n))) for s in range(0, n, warp)]
    elif role == "q":  # per thread: within each warp-sized tile, lane t holds tokens t, t + 8, ...
        for s in range(0, n, warp):
            for lane in range(8):
                groups.append([s + lane + 8 * j for j in range(warp // 8) if s + lane + 8 * j < n])
    else:  # key per thread: 4 lanes per block, lane t holds tokens 8i + 2t and 8i + 2t + 1
        for s in range(0, n, block):
            for lane in range(4):
                groups.append([t for i in range(block // 8) for t in (s + 8 * i + 2 * lane, s + 8 * i + 2 * lane + 1)
                               if t < n])
    return [g for g in groups if g]


def int8_groups(x: torch.Tensor, groups, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, each row's scale): s = absmax / 127 + eps, codes rounded half away from zero."""
    codes, scales = torch.empty_like(x), torch.empty(x.shape[0], 1)
    for g in groups:
        rows = x[g]
        scale = float(rows.abs().max()) / 127.0 + eps
        scales[g] = scale
        if scale == 0:
            codes[g] = 0.0
            continue
        y = rows / scale
        codes[g] = torch.sign(y) * torch.floor(y.abs() + 0.5).clamp(max=127)
    return codes, scales


def fp8_groups(x: torch.Tensor, groups) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scales = torch.empty_like(x), torch.empty(x.shape[0], 1)
    for g in groups:
        rows = x[g]
        scale = float(rows.abs().max()) / 448.0
        scales[g] = scale
        codes[g] = 0.0 if scale == 0 else (rows / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return codes, scales


def one_head(q, k, v, s) -> torch.Tensor:
    lq, d = q.shape
    lk = k.shape[0]
    if s.smooth_k:
        k = k - k.mean(dim=0, keepdim=True)
    bias = None
    if s.smooth_q:
        padded = torch.cat([q, q.new_zeros((-lq) % 128, d)])
        smoothed, means = [], []
        for g in range(0, padded.shape[0], 128):
            mean = padded[g:g + 128].float().mean(dim=0, keepdim=True).to(q.dtype)
            smoothed.append(padded[g:g + 128] - mean)
            means.append(mean.expand(128, d))
        q = torch.cat(smoothed)[:lq]
        bias = (torch.cat(means)[:lq] @ k.T).float()
    qf, kf, vf = q.float(), k.float(), v.float()
    if s.q_prescale:
        qf = qf * (d ** -0.5 * 1.44269504)
    # the kernels dequantize the scores, not Q and K: dot(codes) * (q_scale * k_scale)
    qs, ks = torch.ones(lq, 1), torch.ones(lk, 1)
    if s.qk == "int8":
        qf, qs = int8_groups(qf, token_groups(lq, s.q_granularity, s.block_q, s.warp_q, "q"), s.scale_eps)
        kf, ks = int8_groups(kf, token_groups(lk, s.k_granularity, s.block_k, s.warp_q, "k"), s.scale_eps)
    elif s.qk == "fp8":
        qf, qs = fp8_groups(qf, token_groups(lq, s.q_granularity, s.block_q, s.warp_q, "q"))
        kf, ks = fp8_groups(kf, token_groups(lk, s.k_granularity, s.block_k, s.warp_q, "k"))
    else:
        qf, kf = nvfp4_rows(qf), nvfp4_rows(kf)
    if s.pv == "fp16":
        vq, p_offset = v.half().float(), 0.0
    elif s.pv == "fp8":  # codes per channel; the kernel scales the output by v_scale at the end
        vq, v_scale = torch.empty_like(vf), torch.empty(1, d)
        for c in range(d):
            scale = float(vf[:, c].abs().max()) / 448.0
            v_scale[0, c] = scale
            vq[:, c] = 0.0 if scale == 0 else (vf[:, c] / scale).to(torch.float8_e4m3fn).float()
        p_offset = 8.807
    else:
        padded = torch.cat([vf, vf.new_zeros((-lk) % 16, d)])
        vq = nvfp4_rows(padded.T.contiguous()).T[:lk]
        p_offset = math.log2(448 * 6)
    log2_scale = 1.0 if s.q_prescale else d ** -0.5 * 1.44269504

    m = torch.full((lq, 1), -math.inf)
    l = torch.zeros(lq, 1)
    acc = torch.zeros(lq, d)
    for t in range(0, lk, s.block_kv):
        scores = qf @ kf[t:t + s.block_kv].T
        if s.qk != "nvfp4":
            scores = scores * (qs * ks[t:t + s.block_kv].T)
        if bias is not None:
            scores = scores + bias[:, t:t + s.block_kv]
        scores = scores * log2_scale
        m_new = torch.maximum(m, scores.max(dim=1, keepdim=True).values)
        p = torch.exp2(scores - (m_new - p_offset))
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(dim=1, keepdim=True)
        if s.pv == "fp16":
            part = (p.half().float() @ vq[t:t + s.block_kv]).half().float()
        elif s.pv == "fp8":
            part = p.clamp(max=448).to(torch.float8_e4m3fn).float() @ vq[t:t + s.block_kv]
        else:
            width = p.shape[1]
            pp = torch.cat([p, p.new_zeros(lq, (-width) % 16)], dim=1)
            part = nvfp4_p_rows(pp)[:, :width] @ vq[t:t + s.block_kv]
        acc = acc * alpha + part
        m = m_new
    if s.pv == "fp8":
        acc = acc * v_scale
    return acc / l


def reference_attention(q, k, v, scheme) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, H, Lk, D] -> fp32 [B, H, Lq, D]."""
    out = torch.empty(*q.shape[:3], v.shape[-1])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h] = one_head(q[b, h], k[b, h], v[b, h], scheme)
    return out
