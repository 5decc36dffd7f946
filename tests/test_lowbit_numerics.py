"""The 4-bit and microscaling formats against hand-written references, element by element.

References are loops over Python floats and 0-dim fp32 tensors, written from lightx2v's reference quantizers
(lightx2v_kernel/test/nvfp4_nvfp4/fake_quant.py, the mxfp4/6/8 quant kernels) and the OCP MX v1.0 spec, not
from vqx's code: the E2M1 grid is lightx2v's threshold ladder, e8m0 exponents are found by counting powers of two.
"""

import math

import pytest
import torch

from lowbit_reference import ref_cast_to_fp4, ref_nvfp4_quant
from vqx.quant.formats import SCHEMES
from vqx.quant.linear import quantize_weight
from vqx.quant.numbers import get_grid
from vqx.quant.scheme import TensorScheme, dequantize, fake_quantize, global_scale_of, quantize

F32 = torch.float32


def f32(v) -> torch.Tensor:
    return torch.tensor(v, dtype=F32)


# ---- element grids ------------------------------------------------------------------------------------

def minifloat_values(exp_bits: int, man_bits: int) -> list[float]:
    """Every non-negative value of a sign/exp/man float with IEEE bias, subnormals and no Inf/NaN, ascending."""
    bias = 2 ** (exp_bits - 1) - 1
    out = [m / 2**man_bits * 2.0 ** (1 - bias) for m in range(2**man_bits)]  # zero and subnormals
    for e in range(1, 2**exp_bits):
        out += [(1 + m / 2**man_bits) * 2.0 ** (e - bias) for m in range(2**man_bits)]
    return out


def ref_round(v: float, values: list[float]) -> float:
    """Nearest representable value, ties to the even code (even index: even mantissa), saturating."""
    a = abs(v)
    if a >= values[-1]:
        return math.copysign(values[-1], v)
    for i in range(len(values) - 1):
        lo, hi = values[i], values[i + 1]
        if lo <= a <= hi:
            if a - lo < hi - a or (a - lo == hi - a and i % 2 == 0):
                return math.copysign(lo, v)
            return math.copysign(hi, v)
    raise AssertionError(v)


def test_e2m1_grid_is_lightx2vs_ladder_on_every_multiple_of_1_64_and_its_ties():
    assert minifloat_values(2, 1) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    xs = [k / 64 for k in range(-640, 641)] + [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 1e-30, 7.0, 1e6]
    got = get_grid("fp4_e2m1").round_to_grid(torch.tensor(xs, dtype=F32)).tolist()
    assert got == [ref_cast_to_fp4(v) for v in xs]
    assert got == [ref_round(v, minifloat_values(2, 1)) for v in xs]


@pytest.mark.parametrize("grid,bits", [("fp6_e3m2", (3, 2)), ("fp6_e2m3", (2, 3))])
def test_fp6_grids_round_to_nearest_even_and_saturate(grid, bits):
    values = minifloat_values(*bits)
    assert values[-1] == get_grid(grid).qmax  # 28 and 7.5
    mids = [(a + b) / 2 for a, b in zip(values, values[1:])]  # every tie
    xs = [k / 128 for k in range(-4200, 4201, 7)] + mids + [-m for m in mids] + [values[-1] * 1.01, 1e9]
    got = get_grid(grid).round_to_grid(torch.tensor(xs, dtype=F32)).tolist()
    assert got == [ref_round(v, values) for v in xs]


# ---- NVFP4 --------------------------------------------------------------------------------------------

NVFP4_W = SCHEMES["nvfp4"].weight


def nvfp4_edge_matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=g)
    x[0] = 0.0  # all-zero groups: e4m3 scale 0, codes 0
    x[1, 5] = 2688.0  # a group whose max is the tensor max; global scale exactly 1
    x[2, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.5])
    x[3, :16] = 6 * 2.0 ** -8 * torch.linspace(-1, 1, 16)  # scale 2^-8: an e4m3 subnormal
    x[3, 16:32] = 6 * 2.0 ** -10 * torch.linspace(-1, 1, 16)  # scale 2^-10: halfway to 2^-9, rounds to 0 (even)
    x[3, 32:48] = 6 * 1.5 * 2.0 ** -10 * torch.linspace(-1, 1, 16)  # scale 1.5 * 2^-10: rounds up to 2^-9
    x[4, 16:32] = 1e-3 * torch.randn(16, generator=g)  # small group: scale in e4m3's low normals
    x[5, :16] = torch.tensor([4.9, -5.1, 2.49, 2.51, 0.26, 0.24] + [0.0] * 10)
    return x


def test_nvfp4_weights_match_lightx2vs_reference_code_for_code():
    x = nvfp4_edge_matrix()
    g_ref = (2688.0 / x.bfloat16().abs().max()).to(F32)  # the converter: a bf16 division, then fp32
    g = global_scale_of(x, NVFP4_W)
    assert g.dtype == F32 and float(g) == float(g_ref) == 1.0
    want_codes, want_s8 = ref_nvfp4_quant(x, g_ref)
    codes, scale = quantize(x, NVFP4_W, g)
    assert torch.equal(codes, want_codes)
    assert torch.equal(scale, want_s8 / g_ref)  # effective scale: e4m3 scale over the global scale
    assert torch.equal(codes[2, :16], x[2, :16].clamp(-6, 6).apply_(ref_cast_to_fp4))  # ties at scale 1
    assert codes[2, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert want_s8[3, :3].tolist() == [2.0 ** -8, 0.0, 2.0 ** -9]  # subnormal e4m3 scales, one underflow to 0
    assert (codes[3, 16:32] == 0).all() and (scale[0] == 0).all() and (codes[0] == 0).all()
    assert torch.equal(dequantize(codes, scale, NVFP4_W), codes * (want_s8 / g_ref).repeat_interleave(16, 1))


def test_nvfp4_with_a_non_power_of_two_global_scale():
    x = nvfp4_edge_matrix()
    x[1, 5] = 1000.0  # G = bf16(2688 / 1000) = 2.6875
    x[4, 40] = 223.2558135986328  # G * (amax * fp32(1/6)) and G * amax / 6 round to different e4m3 scales
    g_ref = (2688.0 / x.bfloat16().abs().max()).to(F32)
    assert float(g_ref) == 2.6875 != 2688.0 / 1000.0  # rounded through bf16, as the converter does
    by_division = (g_ref * (f32(223.2558135986328) / 6)).to(torch.float8_e4m3fn).float()
    codes, scale = quantize(x, NVFP4_W)
    want_codes, want_s8 = ref_nvfp4_quant(x, g_ref)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_s8 / g_ref)
    assert float(want_s8[4, 2]) != float(by_division)  # the reference's multiply by fp32(1/6) is followed
    x = x * 0.37
    codes, scale = quantize(x, NVFP4_W)
    want_codes, want_s8 = ref_nvfp4_quant(x, (2688.0 / x.bfloat16().abs().max()).to(F32))
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_s8 / (2688.0 / x.bfloat16().abs().max()).to(F32))


def test_nvfp4_global_scale_is_the_references_bf16_expression():
    """``2688.0 / amax_bf16`` is bf16 arithmetic evaluated as reciprocal then product: not one rounding."""
    for amax, want in [(3.4375, 784.0), (1000.0, 2.6875), (2688.0, 1.0), (0.37, 7264.0)]:
        t = torch.tensor(amax)
        assert float(global_scale_of(t[None, None], NVFP4_W)) == want == float((2688.0 / t.bfloat16()).float())
    assert float(torch.tensor(2688.0 / 3.4375).bfloat16()) == 780.0  # a single rounding would give 780
    assert float(global_scale_of(torch.zeros(2, 16), NVFP4_W)) == 1.0


def test_nvfp4_calibrated_activation_global_scale_saturates_group_scales_at_448():
    """A token above the calibrated absmax: its group scale saturates at 448 (the kernel's satfinite e4m3) and its
    codes at 6, where the reference's unclamped cast would give NaN."""
    act = SCHEMES["nvfp4"].activation
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1], x[1, 16] = 2688.0 * 4, 3.0, 100.0
    g = torch.tensor(1.0)  # calibrated on absmax 2688
    got = fake_quantize(x, act, g)
    assert got[0, 0] == 448 * 6 and got[0, 1] == 0.0  # 3 * 1/448 -> 0
    assert got[1, 16] == 96.0  # s = 100/6 -> e4m3 16; 100/16 = 6.25 -> 6
    ref = fake_quantize(x, act, torch.tensor(0.25))  # a global scale from this input (absmax 10752)
    assert ref[0, 0] == 2688.0 * 4


def test_nvfp4_refuses_non_finite_weights_and_keeps_activation_faults_visible():
    w = nvfp4_edge_matrix()
    for bad in (float("nan"), float("inf")):
        w2 = w.clone()
        w2[4, 3] = bad
        with pytest.raises(ValueError, match="weight has 1 non-finite"):
            quantize_weight(w2, NVFP4_W)
    x = torch.randn(2, 32)
    x[1, 3] = float("nan")
    got = fake_quantize(x, SCHEMES["nvfp4"].activation, torch.tensor(1.0))
    assert torch.isnan(got[1, :16]).all() and torch.isfinite(got[0]).all() and torch.isfinite(got[1, 16:]).all()


# ---- MX (e8m0) ----------------------------------------------------------------------------------------

def ref_e8m0_ceil(amax: torch.Tensor, grid: str) -> float:
    """lightx2v's MX quant kernels: SF = vecMax * 0.16666666666666666f (E2M1) or vecMax / qmax, then
    __nv_cvt_float_to_e8m0(SF, satfinite, RoundPosInf): the smallest power of two >= SF in [2^-127, 2^127]."""
    qmax = get_grid(grid).qmax
    sf = float(amax * f32(1.0 / 6.0)) if grid == "fp4_e2m1" else float(amax / f32(qmax))
    e = -127
    while 2.0 ** e < sf and e < 127:
        e += 1
    return 2.0 ** e


def ref_e8m0_floor(amax: float, grid: str) -> float:
    """OCP MX v1.0 6.3: X = 2^(floor(log2(amax)) - emax_elem), the exponent found by counting."""
    if amax == 0:
        return 2.0 ** -127
    e = 0
    while 2.0 ** (e + 1) <= amax:
        e += 1
    while 2.0 ** e > amax:
        e -= 1
    emax = {"fp4_e2m1": 2, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp8_e4m3": 8}[grid]
    return 2.0 ** max(-127, min(127, e - emax))


def mx_edge_matrix(qmax: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=g)
    x[0] = 0.0
    x[1, :32] = torch.linspace(-qmax, qmax, 32)  # amax / qmax exactly 1: scale 1, no saturation
    x[1, 32] = torch.nextafter(torch.tensor(qmax), torch.tensor(1e9))  # just above: scale 2
    x[2, :32] = 2.0 ** -120 * torch.randn(32, generator=g)  # tiny block: scale near e8m0's minimum
    x[2, 32:] = 1e-42  # subnormal absmax: scale 2^-127
    x[3, :32] = 7.9  # the OCP rule saturates this block for FP4
    x[4, 5] = 3e4
    return x


@pytest.mark.parametrize("name", ["mxfp8", "mxfp6", "mxfp4"])
@pytest.mark.parametrize("rule", ["ceil", "floor"])
def test_mx_weights_match_the_hand_written_reference(name, rule):
    ts = SCHEMES[name].weight
    ts = TensorScheme(ts.grid, ts.granularity, ts.group_size, scale_dtype="e8m0", e8m0_rule=rule)
    values = minifloat_values(*{"fp4_e2m1": (2, 1), "fp6_e3m2": (3, 2)}.get(ts.grid, (4, 3)))
    if ts.grid == "fp8_e4m3":
        values = values[:-1]  # e4m3fn: the top code is NaN, max 448
    x = mx_edge_matrix(ts.grid_.qmax)
    codes, scale = quantize(x, ts)
    for i in range(8):
        for j in range(2):
            blk = x[i, j * 32:(j + 1) * 32]
            amax = blk.abs().max()
            s = ref_e8m0_ceil(amax, ts.grid) if rule == "ceil" else ref_e8m0_floor(float(amax), ts.grid)
            assert float(scale[i, j]) == s, (i, j)
            want = [ref_round(float(v) / s, values) for v in blk]
            assert codes[i, j * 32:(j + 1) * 32].tolist() == want, (i, j)
    if rule == "ceil":  # lightx2v's kernels never saturate a block's max
        assert float(codes.abs().max()) <= ts.grid_.qmax and scale[1, 0] == 1 and scale[1, 1] == 2
        assert scale[0, 0] == 2.0 ** -127 and scale[2, 1] == 2.0 ** -127
    elif ts.grid == "fp4_e2m1":
        assert scale[3, 0] == 1.0 and codes[3, 0] == 6.0  # 7.9 saturates under the OCP rule


def test_e8m0_exponents_at_powers_of_two_and_just_below():
    ts = TensorScheme("fp8_e4m3", "group", group_size=1, scale_dtype="e8m0")
    ocp = TensorScheme("fp8_e4m3", "group", group_size=1, scale_dtype="e8m0", e8m0_rule="floor")
    below = float(torch.nextafter(torch.tensor(8.0), torch.tensor(0.0)))  # log2 in fp32 rounds this to 3
    amax = torch.tensor([[448.0], [448.0 * 2], [below], [8.0], [2.0 ** -133], [3e38]])
    assert scales(ts, amax) == [1.0, 2.0, 2.0 ** -5, 2.0 ** -5, 2.0 ** -127, 2.0 ** 120]
    assert scales(ocp, amax) == [1.0, 2.0, 2.0 ** -6, 2.0 ** -5, 2.0 ** -127, 2.0 ** 119]


def scales(ts, x):
    return quantize(x, ts)[1].flatten().tolist()


# ---- int4 groups, fp8 blocks, static fp8 --------------------------------------------------------------

def test_int4_g128_and_groups_wider_than_a_toy_layer():
    ts = SCHEMES["w4a16_g128"].weight
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 256, generator=g)
    w[1, 128:] = 0.0
    codes, scale = quantize(w, ts)
    assert scale.shape == (4, 2)
    for i in range(4):
        for j in range(2):
            blk = w[i, j * 128:(j + 1) * 128]
            amax = float(blk.abs().max())
            s = 1.0 if amax == 0 else float((f32(amax) / f32(7.0)).bfloat16().float())
            assert float(scale[i, j]) == s
            assert codes[i, j * 128:(j + 1) * 128].tolist() == torch.clamp(torch.round(blk / s), -8, 7).tolist()
    narrow = torch.randn(3, 64, generator=g)  # wan_tiny's widths: a 128-group covers the row
    assert torch.equal(quantize(narrow, ts)[1], quantize(narrow, TensorScheme("int4", "channel", scale_dtype="bf16"))[1])


def test_fp8_b128_block_absmax_floor_and_token_groups():
    s = SCHEMES["fp8_b128"]
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(4))
    w[128:, :] = 1e-6  # a block below deepgemm's 1e-4 floor
    codes, scale = quantize(w, s.weight)
    assert scale.shape == (2, 1)
    floor_scale = float((f32(1e-4) / f32(448.0)).bfloat16().float())
    assert float(scale[1, 0]) == floor_scale
    want = torch.clamp(w[128:] / floor_scale, -448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(codes[128:], want)
    x = torch.zeros(2, 256)
    x[0, :128] = torch.linspace(-3, 3, 128)
    got = fake_quantize(x, s.activation)
    sx = f32(3.0) / f32(448.0)
    assert torch.equal(got[0, :128], torch.clamp(x[0, :128] / sx, -448, 448).to(torch.float8_e4m3fn).float() * sx)
    assert (got[1] == 0).all()  # all-zero groups: scale 1e-10 / 448, codes 0


def test_fp8_static_uses_the_calibrated_scale_and_saturates_above_it():
    act = SCHEMES["fp8_static"].activation
    x = torch.tensor([[0.5, -1.0, 3.0, 0.001]])
    s = torch.tensor(1.0 / 448)  # calibrated on absmax 1
    got = fake_quantize(x, act, s)
    want = torch.clamp(x / s, -448, 448).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(got, want) and float(got[0, 2]) == 1.0
