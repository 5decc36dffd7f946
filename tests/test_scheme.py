"""Schemes: every granularity against a hand-written reference, today's formats unchanged, and format rules."""

import math

import pytest
import torch
from torch import nn

from vqx.quant.formats import SCHEMES, Format, Rule, format_from_config, get_scheme, parse_scheme, uniform
from vqx.quant.linear import QuantLinear
from vqx.quant.numbers import get_grid, quantize as quantize_along
from vqx.quant.scheme import Scheme, TensorScheme, dequantize, fake_quantize, global_scale_of, quantize


def _reference(x: torch.Tensor, rows: int, cols: int, qmax: float, round_codes, scale_of=None):
    """Loops over every (rows x cols) block: scale = absmax / qmax (1 for an all-zero block)."""
    codes, scales = torch.zeros_like(x), torch.zeros(x.shape[0] // rows, x.shape[1] // cols)
    for i in range(x.shape[0] // rows):
        for j in range(x.shape[1] // cols):
            blk = x[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            amax = float(blk.abs().max())
            s = scale_of(amax) if scale_of else (1.0 if amax == 0 else torch.tensor(amax) / torch.tensor(qmax))
            s = torch.as_tensor(s, dtype=torch.float32)
            scales[i, j] = s
            codes[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = round_codes(blk / s)
    return codes, scales


def _edge_matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-3, 2, 64)
    x[0] = 0.0  # an all-zero row: every group of it gets scale 1
    x[1, 5] = 1e4  # a group whose max is the tensor max
    x[2, :16] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5] + [127.0] + [0.0] * 9)  # ties at absmax 127
    x[3, 16:32] = 1e-30  # subnormal-sized scale
    return x


@pytest.mark.parametrize("granularity,group,block", [("group", 16, None), ("group", 32, None), ("block", None, (4, 16)),
                                                     ("channel", None, None), ("tensor", None, None)])
def test_weight_granularity_matches_a_loop_reference_bit_for_bit(granularity, group, block):
    x = _edge_matrix()
    ts = TensorScheme("int8", granularity, group_size=group, block=block)
    codes, scale = quantize(x, ts)
    rows, cols = ts.block_size(tuple(x.shape))
    want_codes, want_scale = _reference(x, rows, cols, 127.0, lambda v: torch.clamp(torch.round(v), -128, 127))
    assert scale.shape == (8 // rows, 64 // cols)
    assert torch.equal(scale, want_scale) and torch.equal(codes, want_codes)
    deq = dequantize(codes, scale, ts)
    ref_deq = codes * scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    assert torch.equal(deq, ref_deq)


def test_token_group_activations_match_the_reference_for_any_leading_shape():
    x = _edge_matrix().reshape(2, 4, 64).bfloat16()
    ts = TensorScheme("fp8_e4m3", "token_group", group_size=16)
    got = fake_quantize(x, ts)
    codes, scale = _reference(x.reshape(8, 64).float(), 1, 16, 448.0,
                              lambda v: torch.clamp(v, -448, 448).to(torch.float8_e4m3fn).float())
    want = (codes * scale.repeat_interleave(16, 1)).reshape(2, 4, 64).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("name", ["w8a8", "fp8", "w8a16", "fp8_w", "fp_e3m4", "fp_e2m5"])
def test_todays_formats_are_schemes_with_identical_numbers(name):
    """Per-channel weights with bf16-representable scales and per-token activations, as numbers.quantize had them."""
    scheme = get_scheme(name)
    x = _edge_matrix()
    codes, scale = quantize(x, scheme.weight)
    want_codes, want_scale = quantize_along(x, get_grid(scheme.weight.grid), dim=1, round_scale_to_bf16=True)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale) and scale.shape == (8, 1)
    if scheme.activation is not None:
        got = fake_quantize(x, scheme.activation)
        c, s = quantize_along(x, get_grid(scheme.activation.grid), dim=-1)
        assert torch.equal(got, c * s)


def test_e8m0_scales_follow_the_ocp_mx_exponent_rule():
    ts = TensorScheme("fp4_e2m1", "group", group_size=4, scale_dtype="e8m0", e8m0_rule="floor")
    # absmax 6 -> 2^(2-2)=1; 7.9 -> 2^(2-2)=1 (7.9 saturates to 6); 8 -> 2^(3-2)=2; 0.1 -> 2^(-4-2); 0 -> 2^-127
    x = torch.tensor([[6.0, 1, 0, 0], [7.9, 0, 0, 0], [8.0, -3.0, 0, 0], [0.1, 0.05, 0, 0], [0, 0, 0, 0]]).reshape(5, 4)
    codes, scale = quantize(x, ts)
    assert scale.flatten().tolist() == [1.0, 1.0, 2.0, 2.0 ** -6, 2.0 ** -127]
    assert codes[1, 0] == 6.0 and codes[2].tolist() == [4.0, -1.5, 0, 0]  # -3/2 = -1.5 is on the E2M1 grid
    assert codes[3].tolist() == [6.0, 3.0, 0, 0]  # 0.1 / 2^-6 = 6.4 -> 6; 0.05 / 2^-6 = 3.2 -> 3


def test_e2m1_grid_rounds_to_nearest_even_and_saturates():
    grid = get_grid("fp4_e2m1")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.2, float("nan")])
    got = grid.round_to_grid(x)
    assert got[:-1].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0]
    assert math.isnan(got[-1])


def test_nvfp4_scales_are_e4m3_values_over_a_bf16_global_scale():
    ts = TensorScheme("fp4_e2m1", "group", group_size=16, scale_dtype="e4m3", global_scale=True)
    x = _edge_matrix()
    g = global_scale_of(x, ts)
    assert float(g) == float(torch.tensor(2688.0).div(x.abs().max().bfloat16().float()).bfloat16())
    codes, scale = quantize(x, ts, g)
    e4m3 = (scale * g).to(torch.float8_e4m3fn).float()
    assert torch.equal(e4m3 / g, scale)  # every effective scale is an e4m3 value over the global scale
    assert float(e4m3.max()) <= 448 and bool((scale >= 0).all())
    assert float(codes.abs().max()) <= 6


def test_bad_schemes_are_one_line_errors():
    with pytest.raises(ValueError, match="needs a positive group_size"):
        TensorScheme("int4", "group")
    with pytest.raises(ValueError, match="does not split into group blocks of 1 x 48"):
        quantize(torch.ones(2, 64), TensorScheme("int4", "group", group_size=48))
    with pytest.raises(ValueError, match="e4m3 group scales need global_scale=true"):
        TensorScheme("fp4_e2m1", "group", group_size=16, scale_dtype="e4m3")
    with pytest.raises(ValueError, match="e8m0_rule='round' is not valid; valid: ceil, floor"):
        TensorScheme("fp4_e2m1", "group", group_size=32, scale_dtype="e8m0", e8m0_rule="round")
    with pytest.raises(ValueError, match="amax_floor=-1 is not valid"):
        TensorScheme("fp8_e4m3", "token", amax_floor=-1)
    with pytest.raises(ValueError, match="unknown number grid 'int3'"):
        TensorScheme("int3", "channel")
    with pytest.raises(ValueError, match="unknown key 'groupsize'"):
        parse_scheme({"weight": {"grid": "int4", "granularity": "group", "groupsize": 128}})
    with pytest.raises(ValueError, match="valid: none, w8a8"):
        get_scheme("w4a4")


def test_quant_linear_with_group_scales_and_static_activations():
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g))
    scheme = Scheme("w4a8_static", TensorScheme("int4", "group", group_size=16),
                    TensorScheme("fp8_e4m3", "tensor", dynamic=False))
    q = QuantLinear(lin, scheme, input_scale=torch.tensor(0.01))
    assert q.weight_scale.shape == (24, 4) and q.weight_codes.abs().max() <= 8
    x = torch.randn(5, 64, generator=g)
    xq = torch.clamp(x / 0.01, -448, 448).to(torch.float8_e4m3fn).float() * 0.01
    w = q.weight_codes.float() * q.weight_scale.repeat_interleave(16, 1)
    assert torch.equal(q(x), nn.functional.linear(xq, w, lin.bias))
    with pytest.raises(ValueError, match="needs a calibrated input_scale"):
        QuantLinear(lin, scheme)


def test_rules_first_match_wins_and_unmatched_layers_stay_float():
    fmt = Format("mixed", (Rule("*.ffn.net.2", get_scheme("fp8")), Rule("blocks.0.*", None), Rule("*", get_scheme("w8a8"))))
    assert fmt.scheme_for("blocks.1.ffn.net.2").name == "fp8"
    assert fmt.scheme_for("blocks.0.ffn.net.2").name == "fp8"  # the earlier rule wins
    assert fmt.scheme_for("blocks.0.attn1.to_q") is None
    assert fmt.scheme_for("blocks.3.attn1.to_q").name == "w8a8"
    assert Format("x", (Rule("*.to_q", get_scheme("w8a8")),)).scheme_for("blocks.0.to_k") is None
    assert [s.name for s in fmt.schemes()] == ["fp8", "w8a8"] and fmt.quantizes and fmt.keeps_float
    assert not uniform(get_scheme("w8a8")).keeps_float and not uniform(None).quantizes


def test_assign_keeps_whole_blocks_as_targets_and_all_layers_without_quantization():
    names = {0: ["blocks.0.a", "blocks.0.b"], 1: ["blocks.1.a", "blocks.1.b"]}
    fmt = Format("f", (Rule("blocks.0.*", None), Rule("*.a", get_scheme("w8a8"))))
    assert {k: v and v.name for k, v in fmt.assign(names).items()} == {"blocks.1.a": "w8a8", "blocks.1.b": None}
    assert fmt.assign(names) == fmt.assign(names)  # deterministic
    assert uniform(None).assign(names) == dict.fromkeys(["blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b"])
    assert [r.pattern for r in fmt.unused_rules(["blocks.1.a"])] == ["blocks.0.*"]


def test_format_from_config_puts_skips_first_and_parses_mappings():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "mine", "skip_first_blocks": 1, "skip_last_blocks": 1, "skip_patterns": ["*.ffn.*"],
                            "rules": [{"pattern": "*", "scheme": {"weight": {"grid": "int4", "granularity": "group",
                                                                             "group_size": 8}}}]})
    fmt = format_from_config(cfg, num_blocks=4)
    assert [r.pattern for r in fmt.rules] == ["blocks.0.*", "blocks.3.*", "*.ffn.*", "*"]
    s = fmt.scheme_for("blocks.1.attn1.to_q")
    assert s.weight == TensorScheme("int4", "group", group_size=8) and s.activation is None
    assert fmt.scheme_for("blocks.3.attn1.to_q") is None and fmt.scheme_for("blocks.2.ffn.net.2") is None
    assert SCHEMES["w8a8"].weight_grid.name == "int8"


def test_lightx2v_refuses_mixtures_and_float_layers_before_any_work(tmp_path):
    from omegaconf import OmegaConf

    from vqx.errors import UserError
    from vqx.export import lightx2v as lx

    def cfg(rules, **fmt):
        return OmegaConf.create({"format": {"name": "mixed", "skip_first_blocks": 0, "skip_last_blocks": 0,
                                            "skip_patterns": [], "rules": rules, **fmt},
                                 "export": {"name": "lightx2v", "dir": str(tmp_path / "x"), "overwrite": False}})

    with pytest.raises(UserError, match="mixes schemes fp8, w8a8 and lightx2v runs one scheme per checkpoint"):
        lx.check(cfg([{"pattern": "*.ffn.net.2", "scheme": "fp8"}, {"pattern": "*", "scheme": "w8a8"}]))
    with pytest.raises(UserError, match="needs every block linear quantized"):
        lx.check(cfg([{"pattern": "*.to_q", "scheme": "w8a8"}]))
    # a user-written mapping equal to w8a8 is what lightx2v loads, whatever its name
    same = {"name": "my_int8", "weight": {"grid": "int8", "granularity": "channel", "scale_dtype": "bf16"},
            "activation": {"grid": "int8", "granularity": "token"}}
    assert lx.refusal(format_from_config(cfg([{"pattern": "*", "scheme": same}]).format)) is None
    assert not (tmp_path / "x").exists()
