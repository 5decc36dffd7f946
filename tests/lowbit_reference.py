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
