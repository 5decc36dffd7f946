"""Reading a low-bit linear back from lightx2v's checkpoint tensors: the verifier's and the loader's side, written
from the layouts lightx2v's kernels read (see `lightx2v_lowbit` for the sources), not from vqx's writer.

``expected_linear`` says which tensors (dtype, shape) a scheme's linear has; ``read_linear`` unpacks them into
vqx's own representation (codes as fp32 grid values, the scales `vqx.quant.scheme.dequantize` multiplies by), so
that ``dequantize(codes, scale)`` is the weight the run evaluated, bit for bit, when the folder is right.
"""

from __future__ import annotations

from typing import Callable

import torch

from .lightx2v_lowbit import E2M1_VALUES, LOWBIT_SCHEMES, MARLIN_GROUP, MARLIN_TILE, marlin_perms


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def expected_linear(scheme: str, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Suffix -> (dtype, shape) of the tensors of one [n, k] linear under lightx2v low-bit ``scheme`` (bias aside)."""
    if scheme == "nvfp4":
        return {"weight": (torch.uint8, (n, k // 2)),
                "weight_scale": (torch.float8_e4m3fn, (_pad(n, 128), _pad(k // 16, 4))),
                "weight_global_scale": (torch.float32, ()), "input_absmax": (torch.float32, ())}
    if scheme in ("mxfp8", "mxfp6-mxfp8", "mxfp4"):
        cols = {"mxfp8": k, "mxfp6-mxfp8": 3 * k // 4, "mxfp4": k // 2}[scheme]
        return {"weight": (torch.uint8, (n, cols)),
                "weight_scale": (torch.float8_e8m0fnu, (_pad(n, 128), _pad(k // 32, 4)))}
    if scheme == "fp8-pertensor":
        return {"weight": (torch.float8_e4m3fn, (n, k)), "weight_scale": (torch.float32, ()),
                "input_scale": (torch.float32, (1,))}
    if scheme == "fp8-b128-deepgemm":
        return {"weight": (torch.float8_e4m3fn, (n, k)), "weight_scale": (torch.float32, (-(-n // 128), -(-k // 128)))}
    if scheme == "int4-g128-marlin":
        return {"weight": (torch.int32, (k // MARLIN_TILE, 2 * n)),
                "weight_scale": (torch.float16, (max(1, k // MARLIN_GROUP), n)),
                "weight_workspace": (torch.int32, (n // 128 * 16,))}
    raise ValueError(f"{scheme!r} is not a lightx2v low-bit scheme; valid: {', '.join(LOWBIT_SCHEMES)}")


def unswizzle(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """uint8 [pad128(rows), pad4(cols)] in the kernels' layout (128 x 4 tiles, each stored [32, 4, 4] as
    (row % 32, row % 128 // 32, col % 4), tiles row-major) -> uint8 [rows, cols]."""
    pr, pc = scales.shape
    tiles = scales.reshape(pr // 128, pc // 4, 32, 4, 4)  # (row tile, col tile, row % 32, row % 128 // 32, col % 4)
    plain = tiles.permute(0, 3, 2, 1, 4).reshape(pr, pc)  # (row tile, row // 32 in tile, row % 32, col tile, col % 4)
    return plain[:rows, :cols]


def e2m1(bits: torch.Tensor) -> torch.Tensor:
    """4-bit patterns (sign in bit 3) -> fp32 values."""
    mag = torch.tensor(E2M1_VALUES)[(bits & 7).long()]  # magnitudes by 3-bit pattern (2 exponent bits, 1 mantissa)
    return torch.where((bits & 8) != 0, -mag, mag)


def e3m2(bits: torch.Tensor) -> torch.Tensor:
    """6-bit patterns (sign bit 5, exponent bits 4..2 with bias 3, mantissa bits 1..0) -> fp32 values."""
    e, m = ((bits >> 2) & 7).float(), (bits & 3).float()
    mag = torch.where(e == 0, m / 4 * 2.0 ** -2, (1 + m / 4) * torch.pow(2.0, e - 3))
    return torch.where((bits & 32) != 0, -mag, mag)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k/2] -> 4-bit patterns [n, k]: element 2i in the low nibble, 2i+1 in the high one."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0xF, packed >> 4
    return out


def sixbits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 3k/4] -> 6-bit patterns [n, k]: bytes [b1 b0 | a5..a0], [c3..c0 | b5..b2], [d5..d0 | c5 c4]."""
    p = packed.reshape(packed.shape[0], -1, 3).to(torch.int32)
    a = p[..., 0] & 63
    b = (p[..., 0] >> 6) | ((p[..., 1] & 15) << 2)
    c = (p[..., 1] >> 4) | ((p[..., 2] & 3) << 4)
    d = p[..., 2] >> 2
    return torch.stack([a, b, c, d], dim=-1).reshape(packed.shape[0], -1).to(torch.uint8)


def marlin_codes(words: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Marlin's B int32 [k/16, 2n] -> signed int4 codes [n, k] as fp32: eight 4-bit codes per word (code i in bits
    4i..4i+3, zero point 8), each 1024-code run of a 16-row tile row in the kernel's fragment order (the inverse of
    ``_perm``), tiles 16 x 16 of the [k, n] matrix."""
    perm = marlin_perms()[0]
    u = words.to(torch.int64) & 0xFFFFFFFF
    runs = torch.empty(u.shape[0], u.shape[1] * 8, dtype=torch.int64)
    for i in range(8):
        runs[:, i::8] = (u >> (4 * i)) & 15
    plain = torch.empty_like(runs.reshape(-1, perm.numel()))
    plain[:, perm] = runs.reshape(-1, perm.numel())  # position perm[j] of a run holds the j-th stored code
    kn = plain.reshape(k // MARLIN_TILE, n // MARLIN_TILE, MARLIN_TILE, MARLIN_TILE).permute(0, 2, 1, 3).reshape(k, n)
    return (kn - 8).t().float()


def marlin_scales(s: torch.Tensor, n: int) -> torch.Tensor:
    """Marlin's s [k/128, n] (64-column runs in ``_scale_perm`` order; 32-column runs in ``_scale_perm_single``'s
    with one group per row) -> fp32 scales [n, k/128]."""
    _, scale_perm, single = marlin_perms()
    order = scale_perm if s.shape[0] > 1 else single
    runs = s.float().reshape(-1, order.numel())
    plain = torch.empty_like(runs)
    plain[:, order] = runs
    return plain.reshape(-1, n).t().contiguous()


def read_linear(get: Callable[[str], torch.Tensor], prefix: str, scheme: str, n: int, k: int) -> dict:
    """Unpack ``prefix``'s tensors (``get(name)``) -> {"codes": fp32 [n, k], "scale": what vqx dequantizes with,
    "input_scale": the calibrated activation value a QuantLinear takes (NVFP4's input_absmax, fp8-pertensor's
    static scale) or None, "global_scale": NVFP4's weight global scale or None}."""
    w = get(f"{prefix}.weight")
    out = {"input_scale": None, "global_scale": None}
    if scheme in ("nvfp4", "mxfp8", "mxfp6-mxfp8", "mxfp4"):
        group = 16 if scheme == "nvfp4" else 32
        raw = unswizzle(get(f"{prefix}.weight_scale").view(torch.uint8), n, k // group)
        if scheme == "nvfp4":
            g = get(f"{prefix}.weight_global_scale").float()
            out["scale"] = raw.view(torch.float8_e4m3fn).float() / g  # group scale over the global scale, fp32
            out["global_scale"], out["input_scale"] = g, get(f"{prefix}.input_absmax").float()
        else:
            out["scale"] = torch.pow(2.0, raw.float() - 127)  # e8m0: a biased power-of-two exponent
        out["codes"] = {"nvfp4": lambda: e2m1(nibbles(w)), "mxfp4": lambda: e2m1(nibbles(w)),
                        "mxfp6-mxfp8": lambda: e3m2(sixbits(w)),
                        "mxfp8": lambda: w.view(torch.float8_e4m3fn).float()}[scheme]()
    elif scheme == "fp8-pertensor":
        out["codes"], out["scale"] = w.float(), get(f"{prefix}.weight_scale").float().reshape(1, 1)
        out["input_scale"] = get(f"{prefix}.input_scale").float().reshape(())
    elif scheme == "fp8-b128-deepgemm":
        out["codes"], out["scale"] = w.float(), get(f"{prefix}.weight_scale").float()
    elif scheme == "int4-g128-marlin":
        out["codes"], out["scale"] = marlin_codes(w, n, k), marlin_scales(get(f"{prefix}.weight_scale"), n)
    else:
        raise ValueError(f"{scheme!r} is not a lightx2v low-bit scheme; valid: {', '.join(LOWBIT_SCHEMES)}")
    return out
