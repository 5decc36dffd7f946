"""The quantizer math against plain reference implementations: exact codes, not tolerances."""

import math

import pytest
import torch

from vqx.quant.numbers import FP8_E4M3_MAX, absmax_scale, get_grid, minifloat_round, quantize

INT8, FP8 = get_grid("int8"), get_grid("fp8_e4m3")


def ref_round_half_even(v: float) -> float:
    f = math.floor(v)
    d = v - f
    if d > 0.5 or (d == 0.5 and f % 2 == 1):
        return f + 1.0
    return float(f)


def test_int8_ties_round_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5])
    codes = INT8.codes(x, torch.tensor(1.0))
    assert codes.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0, -128.0]
    assert codes.tolist() == [ref_round_half_even(v) for v in x.tolist()]


def test_int8_saturates_at_both_ends():
    x = torch.tensor([127.4, 127.6, 500.0, -128.4, -128.6, -1e9])
    assert INT8.codes(x, torch.tensor(1.0)).tolist() == [127, 127, 127, -128, -128, -128]


def test_int8_codes_equal_reference_on_random_data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 3
    codes, scale = quantize(w, INT8, dim=1)
    ref_scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert torch.equal(scale, ref_scale)
    ref = [[max(-128.0, min(127.0, ref_round_half_even(v / s))) for v in row]
           for row, s in zip(w.tolist(), ref_scale.squeeze(1).tolist())]
    assert codes.tolist() == ref
    assert codes.abs().amax(dim=1).eq(127).all()  # the absmax element maps to +-127


def test_bf16_rounded_scale_is_bf16_representable_and_codes_use_it():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    codes, scale = quantize(w, INT8, dim=1, round_scale_to_bf16=True)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())
    assert torch.equal(codes, torch.clamp(torch.round(w / scale), -128, 127))


def test_zero_rows_and_tokens_get_unit_scale_and_zero_codes():
    x = torch.zeros(3, 8)
    x[1] = torch.linspace(-1, 1, 8)
    codes, scale = quantize(x, INT8, dim=-1)
    assert scale[0].item() == 1.0 and scale[2].item() == 1.0
    assert codes[0].eq(0).all() and codes[2].eq(0).all()
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_fp8_codes_equal_torch_cast_after_clamp():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(4000, generator=g) * 300, torch.tensor([448.0, -448.0, 449.0, 464.0, 1e6, -1e6, 0.0, 1e-9])])
    codes = FP8.codes(x, torch.tensor(1.0))
    expected = torch.clamp(x, -448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(codes, expected)
    assert codes.abs().max().item() == FP8_E4M3_MAX


def test_fp8_per_token_scale_maps_absmax_to_448():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    codes, scale = quantize(x, FP8, dim=-1)
    assert torch.equal(codes.abs().amax(dim=-1), torch.full((16,), 448.0))


@pytest.mark.parametrize("grid", [INT8, FP8, get_grid("fp_e3m4")])
def test_nan_and_inf_poison_their_row_never_become_finite_codes(grid):
    x = torch.tensor([[1.0, 2.0, float("nan")], [1.0, float("inf"), 3.0], [1.0, 2.0, 3.0]])
    codes, scale = quantize(x, grid, dim=-1)
    deq = codes * scale
    assert torch.isnan(deq[0]).all()
    assert not torch.isfinite(deq[1]).all()
    assert torch.isfinite(deq[2]).all()


def test_scale_is_fp32_whatever_the_input_dtype():
    x = torch.randn(4, 8).to(torch.bfloat16)
    codes, scale = quantize(x, INT8, dim=-1)
    assert codes.dtype == torch.float32 and scale.dtype == torch.float32
    assert torch.equal(scale, x.float().abs().amax(-1, keepdim=True) / 127)


def _ref_minifloat_values(exp_bits, man_bits):
    bias = 2 ** (exp_bits - 1) - 1
    vals = {0.0}
    for e in range(0, 2**exp_bits):
        for m in range(2**man_bits):
            v = (m / 2**man_bits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**man_bits) * 2.0 ** (e - bias)
            vals.update({v, -v})
    return torch.tensor(sorted(vals))


@pytest.mark.parametrize("exp_bits,man_bits", [(3, 4), (2, 5), (4, 3)])
def test_minifloat_round_is_nearest_grid_value_ties_to_even(exp_bits, man_bits):
    grid = _ref_minifloat_values(exp_bits, man_bits)
    x = torch.cat([torch.randn(3000, generator=torch.Generator().manual_seed(4)) * grid.max() / 2,
                   (grid[1:] + grid[:-1]) / 2])  # every midpoint: a tie
    got = minifloat_round(x, exp_bits, man_bits)
    assert torch.isin(got, grid).all()
    dist = (x[:, None] - grid[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.equal((got - x).abs(), best)  # nearest
    ties = dist.eq(best[:, None]).sum(1) > 1
    mant = (got[ties].abs() / torch.exp2(torch.floor(torch.log2(got[ties].abs().clamp_min(1e-30)))) * 2**man_bits)
    assert (mant.round() % 2 == 0).all()  # ties resolved to an even mantissa


def test_minifloat_saturates():
    assert minifloat_round(torch.tensor([1e6, -1e6]), 3, 4).tolist() == [31.0, -31.0]


def test_absmax_scale_rejects_nothing_but_keeps_nan_visible():
    s = absmax_scale(torch.tensor([[float("nan"), 1.0]]), dim=1, qmax=127)
    assert torch.isnan(s).all()


def test_scales_are_correctly_rounded_divisions():
    # CUDA divides by a Python number through its reciprocal (one ulp off for ~4% of values); the
    # quantizer, the fused kernels and lightx2v's math must all use the correctly rounded quotient.
    from vqx.quant.numbers import absmax_scale, div_exact

    x = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 100
    exact = (x.double() / 127).float()
    assert torch.equal(div_exact(x, 127.0), exact)
    assert not torch.equal(x * (1 / 127.0), exact)  # the reciprocal shortcut really differs here
    rows = x.view(64, 64)
    assert torch.equal(absmax_scale(rows, 1, 127.0).squeeze(1), (rows.abs().amax(1).double() / 127).float())
