"""The tensors lightx2v's low-bit loaders read for one quantized linear (../shared/docs/lightx2v-lowbit-contract.md),
built from a `QuantLinear`'s own codes and scales: names, dtypes, packing and scale layouts.

Per scheme (``P`` a linear's native prefix, e.g. ``blocks.0.self_attn.q``; N out, K in features):

| lightx2v scheme | vqx format | ``P.weight`` | ``P.weight_scale`` | more |
|---|---|---|---|---|
| ``nvfp4`` | nvfp4 | uint8 [N, K/2]: E2M1 nibbles | e4m3 [pad128(N), pad4(K/16)], swizzled | ``P.weight_global_scale`` fp32, ``P.input_absmax`` fp32 |
| ``mxfp8`` | mxfp8 | uint8 [N, K]: e4m3 bits | e8m0 [pad128(N), pad4(K/32)], swizzled | |
| ``mxfp6-mxfp8`` | mxfp6 | uint8 [N, 3K/4]: E3M2 packed 4 in 3 bytes | e8m0, swizzled | |
| ``mxfp4`` | mxfp4 | uint8 [N, K/2]: E2M1 nibbles | e8m0, swizzled | |
| ``fp8-pertensor`` | fp8_static | float8_e4m3fn [N, K] | fp32 [] | ``P.input_scale`` fp32 [1] |
| ``fp8-b128-deepgemm`` | fp8_b128 | float8_e4m3fn [N, K] | fp32 [N/128, K/128] | |
| ``int4-g128-marlin`` | w4a16_g128 | int32 [K/16, 2N]: Marlin tiles | fp16 [K/128, N], permuted | ``P.weight_workspace`` int32 [N/8] zeros |

plus ``P.bias``. Where the layouts come from (ModelTC/LightX2V f8aee98):
- nibble order: ``cvt.rn.satfinite.e2m1x2.f32 byte, hi, lo`` in the fp4 quant kernels puts element 2i in the low
  nibble and 2i+1 in the high one; a code's sign is bit 3 (a negative zero keeps it, as the kernel's does);
- MXFP6: ``mxfp6_quant_kernels_sm120.cu``: four 6-bit codes a, b, c, d become ``[b1 b0 | a5..a0]``,
  ``[c3..c0 | b5..b2]``, ``[d5..d0 | c5 c4]``;
- scale layout: the kernels' ``get_sf_out_address`` (and ``scale_pad_and_swizzle`` in its mxfp6 test): rows padded to
  128 and scale columns to 4 with zeros, each 128 x 4 tile stored as [32 (row % 32), 4 (row % 128 // 32), 4 (col % 4)],
  tiles row-major by (row tile, column tile);
- float tensors go through the loader's bf16 cast: the NVFP4 global scale, ``input_absmax`` and the fp8 scales are
  bf16-representable (checked); ``input_scale`` is stored with shape [1] so that ``x / input_scale`` divides in fp32
  (a 0-dim scale would make the quotient bf16 and round twice).
- Marlin (IST-DASLab/marlin ``Layer.pack``, which lightx2v's ``int4-g128-marlin`` hands to ``marlin_cuda_quant.mul``
  unchanged: its loader neither transposes nor repacks): unsigned codes ``c + 8``, the [K, N] code matrix cut into
  16 x 16 tiles stored tile row by tile row, each 1024-code run of a tile row reordered by ``_perm`` (the tensor
  cores' fragment order) and packed eight codes per int32, code i of a word in bits 4i..4i+3; scales [K/128, N] with
  each 64-column run reordered by ``_scale_perm`` (one group per row: 32-column runs by ``_scale_perm_single``);
  Marlin needs K divisible by 128 and N by 256, and a zeroed int32 workspace of N / 128 * 16 entries
  (``{weight}_workspace``). The loader reads the scales through bf16 and the kernel as fp16: they must be both.
``w4a8`` has no lightx2v scheme.
"""

from __future__ import annotations

import torch

from ..quant.formats import SCHEMES
from ..quant.linear import QuantLinear
from ..quant.scheme import FP8_E4M3_MAX, Scheme

# lightx2v scheme -> the vqx scheme whose numbers it runs (matched by what the scheme is, not its name)
LOWBIT_SCHEMES: dict[str, Scheme] = {
    "nvfp4": SCHEMES["nvfp4"],
    "mxfp8": SCHEMES["mxfp8"],
    "mxfp6-mxfp8": SCHEMES["mxfp6"],
    "mxfp4": SCHEMES["mxfp4"],
    "fp8-pertensor": SCHEMES["fp8_static"],
    "fp8-b128-deepgemm": SCHEMES["fp8_b128"],
    "int4-g128-marlin": SCHEMES["w4a16_g128"],
}
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MARLIN_TILE = 16
MARLIN_GROUP = 128


def marlin_perms() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Marlin's code order within a 1024-code tile-row run, and its scale orders (grouped, one group per row):
    IST-DASLab/marlin ``_get_perms``, the order the kernel's tensor-core fragments read."""
    perm = []
    for i in range(32):
        col = i // 4
        run = [16 * row + col + 8 * block for block in (0, 1)
               for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1)]
        for j in range(4):
            perm.extend(p + 256 * j for p in run)
    perm = torch.tensor(perm).reshape(-1, 8)[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(-1)
    scale_perm = [i + 8 * j for i in range(8) for j in range(8)]
    scale_perm_single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return perm, torch.tensor(scale_perm), torch.tensor(scale_perm_single)


def marlin_check_shape(n: int, k: int) -> str | None:
    """Why Marlin cannot hold an [n, k] linear (its Layer's limits), or None."""
    if k % MARLIN_GROUP or n % 256:
        return (f"Marlin's int4 GEMM needs in_features divisible by {MARLIN_GROUP} and out_features by 256, "
                f"not [{n}, {k}]")
    return None


def marlin_pack(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes [N, K] (fp32, -8..7) and scales [N, K/128] -> Marlin's (B int32 [K/16, 2N], s fp16 [K/128, N])."""
    n, k = codes.shape
    perm, scale_perm, scale_perm_single = marlin_perms()
    w = (codes.to(torch.int64) + 8).t()  # [K, N], Marlin's unsigned codes (zero point 8)
    w = w.reshape(k // MARLIN_TILE, MARLIN_TILE, n // MARLIN_TILE, MARLIN_TILE).permute(0, 2, 1, 3)
    w = w.reshape(-1, perm.numel())[:, perm].reshape(k // MARLIN_TILE, n * MARLIN_TILE)
    words = torch.zeros(w.shape[0], w.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        words |= w[:, i::8] << (4 * i)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # uint32 bits as int32
    s = scale.t()  # [K/128, N]
    order = scale_perm if s.shape[0] > 1 else scale_perm_single
    s = s.reshape(-1, order.numel())[:, order].reshape(-1, n)
    return words.contiguous(), s.to(torch.float16).contiguous()


def lowbit_scheme(scheme: Scheme | None) -> str | None:
    """The lightx2v low-bit scheme that runs ``scheme``'s numbers, or None."""
    if scheme is None:
        return None
    return next((name for name, s in LOWBIT_SCHEMES.items()
                 if (s.weight, s.activation) == (scheme.weight, scheme.activation)), None)


def _magnitude_index(codes: torch.Tensor, values: torch.Tensor, what: str) -> torch.Tensor:
    mag = codes.abs()
    match = mag[..., None] == values
    if not bool(match.any(dim=-1).all()):
        bad = mag[~match.any(dim=-1)].flatten()[0]
        raise ValueError(f"{what} code {float(bad)} is not on the grid (NaN or off-grid codes cannot be packed)")
    return match.to(torch.uint8).argmax(dim=-1).to(torch.uint8)


def e2m1_bits(codes: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 patterns (uint8 0..15) of fp32 codes on the E2M1 grid: sign in bit 3, then exponent and mantissa."""
    idx = _magnitude_index(codes.float(), torch.tensor(E2M1_VALUES, device=codes.device), "E2M1")
    return idx | (torch.signbit(codes.float()).to(torch.uint8) << 3)


def e3m2_values() -> list[float]:
    """The 32 non-negative E3M2 values in code order (bias 3, subnormals, no Inf/NaN)."""
    return [m / 4 * 2.0 ** -2 for m in range(4)] + [(1 + m / 4) * 2.0 ** (e - 3) for e in range(1, 8) for m in range(4)]


def e3m2_bits(codes: torch.Tensor) -> torch.Tensor:
    """6-bit E3M2 patterns (uint8 0..63): sign in bit 5, exponent in bits 4..2, mantissa in bits 1..0."""
    idx = _magnitude_index(codes.float(), torch.tensor(e3m2_values(), device=codes.device), "E3M2")
    return idx | (torch.signbit(codes.float()).to(torch.uint8) << 5)


def pack_nibbles(bits: torch.Tensor) -> torch.Tensor:
    """[N, K] 4-bit patterns -> uint8 [N, K/2]: element 2i in the low nibble, 2i+1 in the high one."""
    if bits.shape[-1] % 2:
        raise ValueError(f"cannot pack {bits.shape[-1]} 4-bit codes per row into bytes (odd)")
    return (bits[:, 0::2] | (bits[:, 1::2] << 4)).contiguous()


def pack_fp6(bits: torch.Tensor) -> torch.Tensor:
    """[N, K] 6-bit patterns -> uint8 [N, 3K/4], four codes a, b, c, d into three bytes as lightx2v's kernel packs."""
    if bits.shape[-1] % 4:
        raise ValueError(f"cannot pack {bits.shape[-1]} 6-bit codes per row (not a multiple of 4)")
    a, b, c, d = (bits[:, k::4].to(torch.int32) for k in range(4))
    p0 = (a | (b << 6)) & 0xFF
    p1 = ((b >> 2) | (c << 4)) & 0xFF
    p2 = ((c >> 4) | (d << 2)) & 0xFF
    return torch.stack([p0, p1, p2], dim=-1).reshape(bits.shape[0], -1).to(torch.uint8).contiguous()


def swizzle_scales(scale_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [M, S] scale bytes -> uint8 [pad128(M), pad4(S)] in the kernels' swizzled layout, padding zeros."""
    m, s = scale_bytes.shape
    pm, ps = -(-m // 128) * 128, -(-s // 4) * 4
    padded = torch.zeros(pm, ps, dtype=torch.uint8, device=scale_bytes.device)
    padded[:m, :s] = scale_bytes
    tiles = padded.reshape(pm // 128, 4, 32, ps // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(pm, ps).contiguous()


def e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 codes (exponent + 127) of power-of-two scales in [2^-127, 2^127]."""
    mant, exp = torch.frexp(scale.float())
    if not bool(((mant == 0.5) & (exp - 1 >= -127) & (exp - 1 <= 127)).all()):
        raise ValueError("e8m0 scales must be powers of two in [2^-127, 2^127]")
    return (exp - 1 + 127).to(torch.uint8)


def _bf16_exact(t: torch.Tensor, what: str) -> torch.Tensor:
    t = t.detach().float().cpu()
    if not torch.equal(t.to(torch.bfloat16).float(), t):
        raise ValueError(f"{what} is not bf16-representable; lightx2v's loader reads it through bf16")
    return t.contiguous()


def linear_tensors(q: QuantLinear, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear under its lightx2v low-bit scheme (names ``prefix.*``)."""
    name = lowbit_scheme(q.scheme)
    if name is None:
        raise ValueError(f"{prefix}: scheme {q.scheme.name} has no lightx2v low-bit scheme; "
                         f"valid: {', '.join(s.name for s in LOWBIT_SCHEMES.values())}")
    codes = q.weight_codes.detach().float().cpu()
    scale = q.weight_scale.detach().float().cpu()
    out: dict[str, torch.Tensor] = {}
    if name == "nvfp4":
        g = q.weight_global_scale.detach().float().cpu()
        s8 = torch.clamp(scale * g, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        if not torch.equal(s8.float() / g, scale):
            raise ValueError(f"{prefix}: NVFP4 scales are not e4m3 values over the global scale")
        out[f"{prefix}.weight"] = pack_nibbles(e2m1_bits(codes))
        out[f"{prefix}.weight_scale"] = swizzle_scales(s8.view(torch.uint8)).view(torch.float8_e4m3fn)
        out[f"{prefix}.weight_global_scale"] = _bf16_exact(g.reshape(()), f"{prefix}.weight_global_scale")
        out[f"{prefix}.input_absmax"] = _bf16_exact(q.input_absmax.reshape(()), f"{prefix}.input_absmax")
    elif name in ("mxfp8", "mxfp6-mxfp8", "mxfp4"):
        if name == "mxfp8":
            out[f"{prefix}.weight"] = codes.to(torch.float8_e4m3fn).view(torch.uint8).contiguous()
        elif name == "mxfp6-mxfp8":
            out[f"{prefix}.weight"] = pack_fp6(e3m2_bits(codes))
        else:
            out[f"{prefix}.weight"] = pack_nibbles(e2m1_bits(codes))
        out[f"{prefix}.weight_scale"] = swizzle_scales(e8m0_bytes(scale)).view(torch.float8_e8m0fnu)
    elif name == "fp8-pertensor":
        out[f"{prefix}.weight"] = codes.to(torch.float8_e4m3fn).contiguous()
        out[f"{prefix}.weight_scale"] = _bf16_exact(scale.reshape(()), f"{prefix}.weight_scale")
        out[f"{prefix}.input_scale"] = _bf16_exact(q.input_scale.reshape(1), f"{prefix}.input_scale")
    elif name == "fp8-b128-deepgemm":
        out[f"{prefix}.weight"] = codes.to(torch.float8_e4m3fn).contiguous()
        out[f"{prefix}.weight_scale"] = _bf16_exact(scale, f"{prefix}.weight_scale")
    else:  # int4-g128-marlin
        why = marlin_check_shape(*codes.shape)
        if why:
            raise ValueError(f"{prefix}: {why}")
        if not torch.equal(scale.to(torch.float16).float(), scale) or not torch.equal(scale.to(torch.bfloat16).float(), scale):
            raise ValueError(f"{prefix}: int4 scales must be exact in bf16 (lightx2v's loader) and fp16 (Marlin's kernel)")
        out[f"{prefix}.weight"], out[f"{prefix}.weight_scale"] = marlin_pack(codes, scale)
        out[f"{prefix}.weight_workspace"] = torch.zeros(codes.shape[0] // 128 * 16, dtype=torch.int32)
    if q.bias is not None:
        out[f"{prefix}.bias"] = q.bias.detach().cpu().contiguous()
    return out
