import pytest
import torch
from torch import nn

from vqx.quant.formats import SCHEMES, get_scheme
from vqx.quant.linear import QuantLinear
from vqx.quant.numbers import quantize


def _linear(dtype, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(48, 24)
    return lin.to(dtype)


@pytest.mark.parametrize("fmt", ["w8a8", "fp8", "w8a16", "fp8_w", "fp_e3m4", "fp_e2m5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_equals_dequantize_then_matmul(fmt, dtype):
    f = get_scheme(fmt)
    lin = _linear(dtype)
    q = QuantLinear(lin, f)
    x = (torch.randn(2, 7, 48) * 3).to(dtype)
    x[0, 0, 5] = 40.0  # an outlier channel in one token
    wc, ws = quantize(lin.weight.data, f.weight_grid, dim=1, round_scale_to_bf16=True)
    w_ref = (wc * ws).to(dtype)
    if f.activation_grid is not None:
        xc, xs = quantize(x, f.activation_grid, dim=-1)
        x_ref = (xc * xs).to(dtype)
    else:
        x_ref = x
    expected = torch.nn.functional.linear(x_ref, w_ref, lin.bias)
    assert torch.equal(q(x), expected)


def test_stored_codes_have_storage_dtype_and_scales_are_fp32():
    q = QuantLinear(_linear(torch.bfloat16), SCHEMES["w8a8"])
    assert q.weight_codes.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert q.weight_scale.shape == (24, 1)
    q = QuantLinear(_linear(torch.bfloat16), SCHEMES["fp8"])
    assert q.weight_codes.dtype == torch.float8_e4m3fn


def test_weights_are_quantized_once():
    lin = _linear(torch.float32)
    q = QuantLinear(lin, SCHEMES["w8a8"])
    lin.weight.data.mul_(2)  # later changes to the float layer do not leak into the quantized one
    assert torch.equal(q.weight, (q.weight_codes.float() * q.weight_scale))


def test_nonfinite_weights_are_refused():
    lin = _linear(torch.float32)
    lin.weight.data[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        QuantLinear(lin, SCHEMES["w8a8"])


def test_input_smoothing_divides_the_input():
    lin = _linear(torch.float32)
    s = torch.rand(48) + 0.5
    smoothed = nn.Linear(48, 24)
    smoothed.weight.data = lin.weight.data * s
    smoothed.bias.data = lin.bias.data.clone()
    f = get_scheme("fp8")
    q = QuantLinear(smoothed, f, input_smooth=s)
    x = torch.randn(5, 48)
    wc, ws = quantize(smoothed.weight.data, f.weight_grid, dim=1, round_scale_to_bf16=True)
    xc, xs = quantize(x * (1 / s), f.activation_grid, dim=-1)
    assert torch.equal(q(x), torch.nn.functional.linear(xc * xs, wc * ws, lin.bias))
