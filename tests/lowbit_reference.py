"""lightx2v's reference quantizers written out value by value (from its kernels' Python references), shared by the
low-bit tests: the independent side of their code-for-code comparisons."""

import math

import torch

F32 = torch.float32


def f32(v) -> torch.Tensor:
    return torch.tensor(v, dtype=F32)


def ref_cast_to_fp4(v: float) -> float:
    """lightx2v fake_quant.cast_to_fp4, one value: its threshold ladder (ties go to the even mantissa)."""
    if math.isnan(v):
        return v
    a = abs(v)
    if a <= 0.25:
        q = 0.0
    elif a < 0.75:
        q = 0.5
    elif a <= 1.25:
        q = 1.0
    elif a < 1.75:
        q = 1.5
    elif a <= 2.5:
        q = 2.0
    elif a < 3.5:
        q = 3.0
    elif a <= 5.0:
        q = 4.0
    else:
        q = 6.0
    return math.copysign(q, v)


def ref_nvfp4_quant(x: torch.Tensor, global_scale: torch.Tensor):
    """lightx2v's ref_nvfp4_quant, value by value: scale = global_scale * (vec_max * get_reciprocal(6.0)) cast to
    e4m3; output_scale = global_scale * get_reciprocal(scale); codes cast_to_fp4(clamp(x * output_scale, -6, 6)).
    Returns (codes, e4m3 scales), fp32."""
    m, n = x.shape
    codes, scales = torch.zeros(m, n), torch.zeros(m, n // 16)
    one_sixth = f32(1.0 / 6.0)
    for i in range(m):
        for j in range(n // 16):
            grp = x[i, j * 16:(j + 1) * 16].float()
            vec_max = grp.abs().max()
            s = (global_scale * (vec_max * one_sixth)).to(torch.float8_e4m3fn).float()
            scales[i, j] = s
            recip = f32(0.0) if float(s) == 0 else f32(1.0) / s
            out = global_scale * recip
            for k in range(16):
                v = float(torch.clamp(grp[k] * out, -6.0, 6.0))
                codes[i, j * 16 + k] = ref_cast_to_fp4(v)
    return codes, scales


def marlin_layer_pack(weight_fp16: torch.Tensor, scales: torch.Tensor, groupsize: int):
    """IST-DASLab/marlin ``Layer.pack`` (marlin/__init__.py), statement by statement, without the CUDA module: a
    fake-quantized fp16 weight [n, k] and its scales [n, k / groupsize] -> (B int32 [k/16, 2n], s fp16 [k/g, n])."""
    import numpy as np

    perm = []
    for i in range(32):
        perm1 = []
        col = i // 4
        for block in [0, 1]:
            for row in [2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1]:
                perm1.append(16 * row + col + 8 * block)
        for j in range(4):
            perm.extend([p + 256 * j for p in perm1])
    perm = np.array(perm)
    interleave = np.array([0, 2, 4, 6, 1, 3, 5, 7])
    perm = torch.from_numpy(perm.reshape((-1, 8))[:, interleave].ravel())
    scale_perm = []
    for i in range(8):
        scale_perm.extend([i + 8 * j for j in range(8)])
    scale_perm_single = []
    for i in range(4):
        scale_perm_single.extend([2 * i + j for j in [0, 1, 8, 9, 16, 17, 24, 25]])

    n, k = weight_fp16.shape
    tile, maxq = 16, 2 ** 4 - 1
    s = scales.t().half()
    w = weight_fp16.t()
    if groupsize != k:
        w = w.reshape((-1, groupsize, n))
        w = w.permute(1, 0, 2)
        w = w.reshape((groupsize, -1))
        s = s.reshape((1, -1))
    w = torch.round(w / s).int()
    w += (maxq + 1) // 2
    w = torch.clamp(w, 0, maxq)
    if groupsize != k:
        w = w.reshape((groupsize, -1, n))
        w = w.permute(1, 0, 2)
        w = w.reshape((k, n)).contiguous()
        s = s.reshape((-1, len(scale_perm)))[:, scale_perm]
    else:
        s = s.reshape((-1, len(scale_perm_single)))[:, scale_perm_single]
    s = s.reshape((-1, n)).contiguous()
    w = w.reshape((k // tile, tile, n // tile, tile))
    w = w.permute((0, 2, 1, 3))
    w = w.reshape((k // tile, n * tile))
    res = w.reshape((-1, perm.numel()))[:, perm].reshape(w.shape)
    q = np.zeros((res.shape[0], res.shape[1] // 8), dtype=np.uint32)
    res = res.cpu().numpy().astype(np.uint32)
    for i in range(8):
        q |= res[:, i::8] << 4 * i
    return torch.from_numpy(q.astype(np.int32)), s
