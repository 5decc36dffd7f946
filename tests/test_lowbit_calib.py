"""Calibrated activation values (fp8_static's static scale, NVFP4's activation global scale) from each statistic,
and the quantized linears that use them, against hand-written references."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lowbit_reference import ref_nvfp4_quant
from vqx.algorithms.act_calib import calibrated_input_scales
from vqx.algorithms.registry import BlockContext
from vqx.calib.stats import GroupStats
from vqx.models.adapter import InputGroup, QuantTarget
from vqx.quant.formats import SCHEMES
from vqx.quant.linear import QuantLinear
from vqx.quant.scheme import Scheme, TensorScheme

F32 = torch.float32


def _calib(**kw):
    return OmegaConf.create({"act_statistic": "absmax", "act_percentile": 99.0, "act_grid": 10, "act_clip_min": 0.5,
                             **kw})


def _context(scheme_name: str, calls: list[torch.Tensor], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    block = nn.Module()
    block.a, block.b = nn.Linear(32, 16), nn.Linear(32, 8)
    with torch.no_grad():
        block.a.weight.copy_(torch.randn(16, 32, generator=g))
        block.b.weight.copy_(torch.randn(8, 32, generator=g) * 0.1)
    stats = GroupStats(32, sample_tokens=None, hessian_tokens=None, want_hessian=False, seed=0, device=torch.device("cpu"))
    for c, x in enumerate(calls):
        stats.update(x, c)
    targets = {n: QuantTarget(0, n, getattr(block, n), f"blocks.0.{n}", n) for n in ("a", "b")}
    scheme = SCHEMES[scheme_name] if isinstance(scheme_name, str) else scheme_name
    ctx = BlockContext(0, block, [InputGroup("in", ("a", "b"))], targets, {"in": stats}, {"a": scheme, "b": scheme})
    return ctx, torch.cat(calls)


def _calls(seed=1, tokens=40):
    g = torch.Generator().manual_seed(seed)
    calls = [torch.randn(tokens, 32, generator=g) * (1 + c) for c in range(3)]
    calls[2][7, 3] = 50.0  # one outlier token
    return calls


def test_absmax_statistic_is_the_max_over_every_call():
    ctx, x = _context("fp8_static", _calls())
    got = calibrated_input_scales(ctx, _calib())
    want = torch.tensor(50.0 / 448.0, dtype=F32).bfloat16().float()  # lightx2v reads input_scale through bf16
    assert set(got) == {"blocks.0.a", "blocks.0.b"} and float(got["blocks.0.a"]) == float(want)
    ctx, _ = _context("nvfp4", _calls())
    got = calibrated_input_scales(ctx, _calib())
    assert float(got["blocks.0.b"]) == 50.0  # lightx2v's input_absmax; QuantLinear derives the loader's G from it
    q = QuantLinear(ctx.block.b, SCHEMES["nvfp4"], input_scale=got["blocks.0.b"])
    assert float(q.input_absmax) == 50.0 and float(q.input_scale) == float((2688.0 / torch.tensor(50.0).bfloat16()).float())


def test_percentile_statistic_is_a_percentile_of_token_absmax():
    ctx, x = _context("fp8_static", _calls())
    got = calibrated_input_scales(ctx, _calib(act_statistic="percentile", act_percentile=99.0))
    tokens = sorted(float(v) for v in x.abs().amax(dim=1))  # 120 tokens: the 99th percentile by linear interpolation
    pos = 0.99 * (len(tokens) - 1)
    lo = int(pos)
    amax = tokens[lo] + (tokens[lo + 1] - tokens[lo]) * (pos - lo)
    assert float(got["blocks.0.a"]) == pytest.approx(float(torch.tensor(amax / 448.0).bfloat16()), rel=0)
    assert ctx.choices["in"]["act_absmax"] == pytest.approx(amax, rel=1e-6) and amax < 50.0


INT8_STATIC = Scheme("int8_static", TensorScheme("int8", "tensor"), TensorScheme("int8", "tensor", dynamic=False))


def _int8_dq(x, s):
    return torch.clamp(torch.round(x / s), -128, 127) * s


def test_mse_statistic_picks_the_clip_with_the_lowest_group_output_error():
    ctx, x = _context(INT8_STATIC, _calls(tokens=2000))
    got = calibrated_input_scales(ctx, _calib(act_statistic="mse", act_grid=4, act_clip_min=0.2))
    errs = {}  # by hand: each candidate's scale, both linears' per-tensor int8 weights, the summed squared error
    for k in range(5):
        s = torch.tensor(50.0) * (1 - k * 0.8 / 4) / 127.0
        err = 0.0
        for lin in (ctx.block.a, ctx.block.b):
            w = lin.weight.detach()
            wdq = _int8_dq(w, w.abs().max() / 127.0)
            err += float(((_int8_dq(x, s) @ wdq.T) - (x @ w.T)).pow(2).sum())
        errs[k] = (err, s)
    best = min(errs, key=lambda k: errs[k][0])
    assert best != 0 and float(got["blocks.0.a"]) == float(errs[best][1])  # the outlier token is worth clipping
    fp8, _ = _context("fp8_static", _calls(tokens=2000))  # fp8's relative precision: clipping does not pay
    assert float(calibrated_input_scales(fp8, _calib(act_statistic="mse"))["blocks.0.a"]) == float(
        (torch.tensor(50.0) / 448.0).bfloat16())


def test_mse_statistic_for_nvfp4_searches_the_activation_global_scale():
    ctx, x = _context("nvfp4", _calls())
    got = calibrated_input_scales(ctx, _calib(act_statistic="mse", act_grid=4, act_clip_min=0.2))
    errs = {}
    for k in range(5):
        amax = torch.tensor(50.0) * (1 - k * 0.8 / 4)
        g_act = (2688.0 / amax.bfloat16()).float()
        xc, xs = ref_nvfp4_quant(x, g_act)
        xdq = xc * (xs / g_act).repeat_interleave(16, 1)
        err = 0.0
        for lin in (ctx.block.a, ctx.block.b):
            w = lin.weight.detach()
            g_w = (2688.0 / w.bfloat16().abs().max()).float()
            wc, ws = ref_nvfp4_quant(w, g_w)
            err += float(((xdq @ (wc * (ws / g_w).repeat_interleave(16, 1)).T) - (x @ w.T)).pow(2).sum())
        errs[k] = (err, amax.bfloat16().float())
    best = min(errs, key=lambda k: errs[k][0])
    assert float(got["blocks.0.a"]) == float(errs[best][1])


def test_nvfp4_quant_linear_with_a_calibrated_global_scale_is_the_reference_matmul():
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g))
    g_act = torch.tensor(2688.0 / 4.0)  # calibrated on absmax 4
    q = QuantLinear(lin, SCHEMES["nvfp4"], input_scale=torch.tensor(4.0))
    assert float(q.input_scale) == float(g_act)
    x = torch.randn(7, 64, generator=g) * 2
    x[0, 0] = 9.0  # above the calibrated range: its group saturates
    xc, xs = ref_nvfp4_quant(x, g_act)
    g_w = (2688.0 / lin.weight.detach().bfloat16().abs().max()).float()
    wc, ws = ref_nvfp4_quant(lin.weight.detach(), g_w)
    assert float(q.weight_global_scale) == float(g_w)
    xdq = xc * (xs / g_act).repeat_interleave(16, 1)
    wdq = wc * (ws / g_w).repeat_interleave(16, 1)
    assert torch.equal(q(x), nn.functional.linear(xdq, wdq, lin.bias))
    with pytest.raises(ValueError, match="needs a calibrated input_absmax"):
        QuantLinear(lin, SCHEMES["nvfp4"])
