"""Evaluation backends: group-shared and fused activation quantization, real 8-bit GEMMs, set_backend.

The Triton kernels cannot run on a CPU; their tests run them through Triton's interpreter in a subprocess
(TRITON_INTERPRET=1), against the same eager twins and the fp32 reference quantizer. On a GPU the kernels
check themselves against the twins on first use, and bench/eval_speed.py asserts bit equality again.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vqx.algorithms.materialize import materialize
from vqx.models.adapter import LayerSelection, quant_targets, set_submodule
from vqx.models.wan.fused import FusedWanTransformerBlock
from vqx.quant import fastpath
from vqx.quant.backends import BACKENDS, set_backend
from vqx.quant.formats import get_scheme
from vqx.quant.linear import QuantLinear
from vqx.quant.scheme import TensorScheme
from vqx.quant.shared import SharedInput
from vqx.quant.numbers import get_grid, quantize

ROOT = Path(__file__).resolve().parents[1]


def _tiny_transformer(i2v=False, dtype=torch.bfloat16):
    from vqx.models.wan.tiny import _transformer, cast_transformer

    torch.manual_seed(0)
    return cast_transformer(_transformer(i2v), dtype).eval()


def _inputs(i2v=False, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(1, 36 if i2v else 16, 2, 8, 8, generator=g).to(dtype),
              timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype), return_dict=False)
    if i2v:
        kw["encoder_hidden_states_image"] = torch.randn(1, 257, 32, generator=g).to(dtype)
    return kw


def _per_linear(base, fmt):
    """Every block linear replaced by a QuantLinear, diffusers' own forward: each linear quantizes its input."""
    model = copy.deepcopy(base)
    for t in quant_targets(model, LayerSelection()):
        set_submodule(model.blocks[t.block], t.local_name, QuantLinear(t.module, get_scheme(fmt)))
    return model


def _materialized(base, fmt, selection=LayerSelection()):
    model = copy.deepcopy(base)
    materialize(model, quant_targets(model, selection), get_scheme(fmt), {})
    return model


@torch.no_grad()
def _out(model, kw):
    with fastpath.use_impl("eager"):
        return model(**kw)[0]


# ---------------------------------------------------------------------------------------------------
# eager path: the reference arithmetic, group shared


@pytest.mark.parametrize("grid", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_activation_codes_are_the_reference_quantizers(grid, dtype):
    g = get_grid(grid)
    x = fastpath.probe_rows(64, dtype, "cpu", seed=3)  # zeros, outliers, NaN/Inf, tiny/huge, every bf16 value
    codes, scale = quantize(x, g, dim=-1)
    got = fastpath.quantize_act(x, fastpath.QuantSpec(TensorScheme(grid, "token"), None, "codes"))
    finite = torch.isfinite(codes).all(dim=-1)  # int8 has no NaN: those rows carry NaN in their scale
    assert torch.equal(got.codes.float()[finite], codes[finite])
    assert fastpath.bits_equal(got.scale, scale)
    assert not torch.isfinite(got.scale[~finite]).any()  # NaN or Inf: the GEMM output of the row is NaN
    fake = fastpath.quantize_act(x, fastpath.QuantSpec(TensorScheme(grid, "token"), None, "fake"))
    assert fastpath.bits_equal(fake, (codes * scale).to(dtype))


def test_bits_equal_sees_one_ulp_and_signed_zero():
    a = torch.tensor([1.0, 0.0, float("nan")], dtype=torch.bfloat16)
    assert fastpath.bits_equal(a, a.clone())
    b = a.clone()
    b[0] = 1.0078125  # the next bf16 after 1.0
    assert not fastpath.bits_equal(a, b)
    c = a.clone()
    c[1] = -0.0
    assert not fastpath.bits_equal(a, c)


@pytest.mark.parametrize("i2v", [False, True])
@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
@pytest.mark.parametrize("backend", ["fake", "kernel"])
def test_group_shared_model_equals_per_linear_quantization(i2v, fmt, backend):
    base = _tiny_transformer(i2v)
    ref = _per_linear(base, fmt)
    shared = _materialized(base, fmt)
    assert all(type(b) is FusedWanTransformerBlock for b in shared.blocks)
    set_backend(ref, backend)
    set_backend(shared, backend)
    kw = _inputs(i2v)
    assert fastpath.bits_equal(_out(shared, kw), _out(ref, kw))


@pytest.mark.parametrize("smoothed", [False, True])
def test_each_input_group_is_quantized_once(monkeypatch, smoothed):
    base = _tiny_transformer()
    model = copy.deepcopy(base)
    # lightx2v's affine_norm1 vector: q/k/v each hold a copy of the same 1/s
    smooth = {0: {"affine_norm1": torch.rand(32) + 0.5}} if smoothed else None
    materialize(model, quant_targets(model, LayerSelection()), get_scheme("w8a8"), {}, smooth)
    calls = []
    real = fastpath.quantize_eager
    monkeypatch.setattr(fastpath, "quantize_eager", lambda x, spec: calls.append(x.shape) or real(x, spec))
    _out(model, _inputs())
    # per block: attn1 q/k/v once, attn1 out, attn2 q, attn2 k/v once, attn2 out, ffn in, ffn out = 7 (not 10)
    assert len(calls) == 7 * len(model.blocks)


def test_partial_quantization_and_runtime_smoothing_match_per_linear():
    base = _tiny_transformer()
    sel = LayerSelection(skip_patterns=("blocks.0.attn1.to_k", "blocks.1.ffn.*"))
    shared = _materialized(base, "fp8", sel)
    ref = copy.deepcopy(base)
    for t in quant_targets(ref, sel):
        set_submodule(ref.blocks[t.block], t.local_name, QuantLinear(t.module, get_scheme("fp8")))
    kw = _inputs()
    assert fastpath.bits_equal(_out(shared, kw), _out(ref, kw))

    # q/k/v sharing one 1/s vector (lightx2v's affine_norm1), as the algorithms install it
    s = torch.rand(32) + 0.5
    smooth = {0: {"affine_norm1": s}}
    shared = copy.deepcopy(base)
    materialize(shared, quant_targets(shared, LayerSelection()), get_scheme("w8a8"), {}, smooth)
    ref = copy.deepcopy(base)
    for t in quant_targets(ref, LayerSelection()):
        inv = s if t.block == 0 and t.local_name.startswith("attn1.to_") and t.local_name != "attn1.to_out.0" else None
        set_submodule(ref.blocks[t.block], t.local_name, QuantLinear(t.module, get_scheme("w8a8"), input_smooth=inv))
    assert shared.blocks[0].attn1.to_q.input_smooth_inv is not None
    assert fastpath.bits_equal(_out(shared, kw), _out(ref, kw))


def test_shared_input_is_not_reused_after_an_in_place_change():
    g = SharedInput("g", ("a", "b"), 2)
    x = torch.ones(3)
    g.put(x, ("k",), "value", 1)
    assert g.lookup(x, ("other",)) is None  # another quantization of the same tensor
    assert g.lookup(x.clone(), ("k",)) is None  # another tensor
    x.add_(1)
    assert g.lookup(x, ("k",)) is None  # modified since
    g.put(x, ("k",), "value", 1)
    assert g.lookup(x, ("k",)) == "value" and g.pending == 0


def test_hooks_see_the_real_input_and_keep_outputs():
    base = _tiny_transformer()
    model = _materialized(base, "w8a8")
    seen = []
    model.blocks[0].attn1.to_k.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    assert model.blocks[0]._group_spec("self_attn_in", model.blocks[0].attn1) is None  # no fused placeholder
    kw = _inputs()
    assert fastpath.bits_equal(_out(model, kw), _out(_per_linear(base, "w8a8"), kw))
    assert seen and seen[0].dtype == torch.bfloat16


def test_grouped_kernel_serves_only_what_it_reproduces():
    """The grouped fake-quant kernel takes a spec only where its arithmetic is the eager path's; the rest stays
    eager (codes, dynamic per-tensor scales, groups that do not divide K, NVFP4 past its range check)."""
    nvfp4 = get_scheme("nvfp4").activation
    top = 2.0 ** 117  # the smallest e4m3 scale (2^-9) over this global scale is the smallest normal fp32
    assert torch.tensor(2.0 ** -9) / top == torch.finfo(torch.float32).tiny
    spec = fastpath.QuantSpec(nvfp4, None, "fake", torch.tensor(top), top)
    assert fastpath.group_config(spec, 64)["MODE"] == 3
    assert fastpath.group_config(spec._replace(static_value=top * 2), 64) is None  # the eager range check runs
    assert fastpath.group_config(spec._replace(static_value=None), 64) is None
    mx = fastpath.QuantSpec(get_scheme("mxfp8").activation, None, "fake")
    assert fastpath.group_config(mx, 64)["MODE"] == 1 and fastpath.group_config(mx._replace(mode="codes"), 64) is None
    assert fastpath.group_config(mx, 48) is None  # 48 does not split into groups of 32: the eager path refuses it
    assert fastpath.group_config(mx, 16)["G"] == 16  # a group wider than K covers the row
    dynamic_tensor = fastpath.QuantSpec(TensorScheme("fp8_e4m3", "tensor"), None, "fake")
    assert fastpath.group_config(dynamic_tensor, 64) is None
    static = get_scheme("fp8_static").activation
    static_spec = fastpath.QuantSpec(static, None, "fake", torch.tensor(0.1))
    assert fastpath.group_config(static_spec, 64)["MODE"] == 4
    assert fastpath.group_config(static_spec._replace(mode="codes"), 64)["CODES"]  # fp8-pertensor's GEMM operand
    b128 = fastpath.QuantSpec(get_scheme("fp8_b128").activation, None, "codes")
    assert fastpath.group_config(b128, 256)["CODES"] and fastpath.group_config(b128, 256)["MODE"] == 0


# ---------------------------------------------------------------------------------------------------
# kernel backend


def test_set_backend_validates_the_name_and_the_format():
    model = _materialized(_tiny_transformer(), "w8a8")
    with pytest.raises(ValueError, match="fake, kernel"):
        set_backend(model, "cuda")
    assert set_backend(model, "kernel") == 20 and model.blocks[0].attn1.to_q.backend == "kernel"
    weight_only = _materialized(_tiny_transformer(), "w8a16")
    with pytest.raises(ValueError, match="w8a16"):
        set_backend(weight_only, "kernel")
    assert all(q.backend == "fake" for q in weight_only.modules() if isinstance(q, QuantLinear))
    assert BACKENDS == ("fake", "kernel")


@pytest.mark.parametrize("fmt,scheme", [("w8a8", "int8"), ("fp8", "fp8")])
def test_kernel_backend_is_lightx2v_math(fmt, scheme):
    from vqx.export.lightx2v_math import quant_linear

    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(64, 48).bfloat16(), get_scheme(fmt))
    set_backend(q, "kernel")
    x = (torch.randn(2, 20, 64) * 3).bfloat16()
    x[0, 3, 7] = 200.0
    want = quant_linear(x, q.weight_codes, q.weight_scale, q.bias, scheme)
    assert fastpath.bits_equal(q(x), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_backend_fp8_static_is_lightx2v_pertensor(dtype):
    """fp8_static through the kernel backend computes lightx2v's fp8-pertensor apply (static codes, torch._scaled_mm
    with per-tensor scales and fast accumulation), bit for bit, from the tensors the exporter writes."""
    from vqx.export.lightx2v_math import quant_linear_pertensor

    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(64, 48).to(dtype), get_scheme("fp8_static"), input_scale=torch.tensor(0.011))
    x = (torch.randn(2, 20, 64) * 3).to(dtype)
    x[0, 3, 7] = 200.0  # clipped at 448 x the static scale
    fake = q(x)
    set_backend(q, "kernel")
    got = q(x)
    want = quant_linear_pertensor(x, q.weight_codes, q.weight_scale, q.input_scale, q.bias)
    assert got.dtype == dtype and fastpath.bits_equal(got, want)
    # the fake backend differs only by the rounding of the dequantized operands (relative 0.17-0.30% measured)
    assert ((got.float() - fake.float()).norm() / fake.float().norm()).item() < 0.01


def test_kernel_backend_fp8_b128_is_the_block_scaled_gemm():
    """fp8_b128 through the kernel backend: the activation's group codes and scales [M, K/128] times the weight's
    128 x 128 block codes and scales, summed to bf16, then the bias added in bf16 (DeepGEMM's GEMM, then lightx2v's
    add_); K = 256 and N = 384 span several groups and blocks, so a transposed scale layout shows."""
    from vqx.quant.scheme import dequantize

    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(256, 384).bfloat16(), get_scheme("fp8_b128"))
    x = (torch.randn(3, 20, 256) * torch.logspace(-1, 1, 256)).bfloat16()
    x[0, 3, 7] = 200.0
    fake = q(x)
    set_backend(q, "kernel")
    act = fastpath.quantize_act(x, q.quant_spec())
    assert act.scale.shape == (60, 2)
    a = dequantize(act.codes.float(), act.scale, q.act_scheme)
    want = (a @ q.dequantized_weight_fp32().t()).bfloat16() + q.bias
    got = q(x)
    assert fastpath.bits_equal(got, want.reshape(3, 20, 384))
    # against the fake backend: the rounding of the dequantized operands (relative 3.5e-3 measured)
    assert ((got.float() - fake.float()).norm() / fake.float().norm()).item() < 0.01


@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_kernel_and_fake_backends_agree(fmt):
    # Measured: linear outputs differ by 3.0e-3 to 3.2e-3 (relative, Frobenius), the bf16 rounding of the
    # dequantized operands of the fake GEMM; a tiny Wan model's output by about 5e-3.
    errs = []
    for seed in range(3):
        torch.manual_seed(seed)
        q = QuantLinear(nn.Linear(512, 384).bfloat16(), get_scheme(fmt))
        x = (torch.randn(64, 512) * torch.rand(64, 1) * 4).bfloat16()
        x[:, 7] *= 30
        x[3] = 0
        fake = q(x).float()
        set_backend(q, "kernel")
        errs.append(((q(x).float() - fake).norm() / fake.norm()).item())
    assert 1e-4 < max(errs) < 1e-2  # they differ (two computations) and only by rounding
    base = _tiny_transformer()
    model = _materialized(base, fmt)
    kw = _inputs()
    fake = _out(model, kw).float()
    set_backend(model, "kernel")
    kernel = _out(model, kw).float()
    assert ((kernel - fake).norm() / fake.norm()).item() < 2e-2


@pytest.mark.parametrize("backend", ["fake", "kernel"])
def test_tiny_pipeline_generates_finite_video_on_each_backend(backend):
    from vqx.models.sampling import SamplerSettings, generate
    from vqx.models.wan.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("t2v", seed=0)
    tr = pipe.transformer
    materialize(tr, quant_targets(tr, LayerSelection()), get_scheme("fp8" if backend == "kernel" else "w8a8"), {})
    set_backend(tr, backend)
    video = generate(pipe, "a red ball bounces", SamplerSettings(height=32, width=32, num_frames=5, steps=2,
                                                                  guidance=3.0, shift=3.0), seed=0)
    assert video.shape[-1] == 3 and np.isfinite(video).all() and video.std() > 0


# ---------------------------------------------------------------------------------------------------
# Triton kernels, through the interpreter

_INTERPRETED = r"""
import json, copy, torch
from vqx.models.wan import ops
from vqx.quant.scheme import TensorScheme
from vqx.quant import fastpath as fp
from vqx.quant.numbers import get_grid
res = {}
for grid in ("int8", "fp8_e4m3"):
    for mode in ("fake", "codes"):
        for dtype in (torch.bfloat16, torch.float32):
            x = fp.probe_rows(96, dtype, "cpu", seed=5)
            for smooth in (None, torch.rand(96) + 0.5):
                spec = fp.QuantSpec(TensorScheme(grid, "token"), smooth, mode)
                res[f"quant {grid} {mode} {dtype} smooth={smooth is not None}"] = fp.same_quantization(
                    fp.quantize_act(x, spec), fp.quantize_eager(x, spec))
# The grouped fake-quant kernel (token groups, MX e8m0 both rules, NVFP4, static fp8, int and minifloat grids): its
# first-use check (edge rows) and the dispatched result against the eager twin.
from vqx.quant.formats import get_scheme as scheme_of
from vqx.quant.scheme import nvfp4_global_scale
customs = {"int4 g64 bf16": TensorScheme("int4", "token_group", group_size=64, scale_dtype="bf16"),
           "e2m3 floor": TensorScheme("fp6_e2m3", "token_group", group_size=32, scale_dtype="e8m0", e8m0_rule="floor"),
           "e2m1 floor": TensorScheme("fp4_e2m1", "token_group", group_size=32, scale_dtype="e8m0", e8m0_rule="floor")}
for name in ("nvfp4", "mxfp8", "mxfp4", "mxfp6", "fp8_b128", "fp8_static", *customs):
    act = customs[name] if name in customs else scheme_of(name).activation
    static = None
    if act.calibrated:
        static = nvfp4_global_scale(torch.tensor(7.3)) if act.global_scale else torch.tensor(0.02)
    for dtype in (torch.bfloat16, torch.float32):
        for smooth in (None, torch.rand(256) + 0.5):
            for mode in ("fake", "codes") if name in ("fp8_static", "fp8_b128") else ("fake",):  # codes: their GEMMs
                spec = fp.QuantSpec(act, smooth, mode, static, None if static is None else float(static))
                x = fp.probe_rows(256, dtype, "cpu", seed=6)
                res[f"group quant {name} {mode} {dtype} smooth={smooth is not None}"] = fp.same_quantization(
                    fp.quantize_act(x, spec), fp.quantize_eager(x, spec))
# one check per (scheme, mode, dtype, smoothing): mxfp6's activations are mxfp8's
res["group quant kernels checked"] = sum(r["kernel"] == "group_quant" and r["bit_exact"] for r in fp.report()) == 10 * 4
g = torch.Generator().manual_seed(0)
n = torch.randn(2, 10, 96, generator=g) * 3
n[0, 1] = 0
n[1, 2] *= 1e30
sc, sh = torch.randn(2, 1, 96, generator=g), torch.randn(2, 1, 96, generator=g)
for grid in ("int8", "fp8_e4m3"):
    for mode in ("fake", "codes"):
        spec = fp.QuantSpec(TensorScheme(grid, "token"), torch.rand(96) + 0.5, mode)
        h, act = ops.modulate(n, sc, sh, torch.bfloat16, spec)
        res[f"modulate+quant {grid} {mode}"] = h is None and fp.same_quantization(
            act, fp.quantize_eager(ops.modulate_eager(n, sc, sh, torch.bfloat16), spec))
        h, act = ops.cast(n, torch.bfloat16, spec)
        res[f"cast+quant {grid} {mode}"] = h is None and fp.same_quantization(act, fp.quantize_eager(n.bfloat16(), spec))
        y = (torch.randn(4, 96, generator=g) * 3).bfloat16()
        gspec = fp.QuantSpec(TensorScheme(grid, "token"), None, mode)
        # The fused GELU + quantization kernel, each GELU variant, run directly (whether or not the variant is the
        # one the interpreter's tanh makes exact): its codes are the reference quantizer's of its own GELU
        # output, bit for bit, and that output is the eager GELU to within one bf16 step, plus |y| * 2^-23 where
        # 1 + tanh cancels (measured on every 16th bf16 value and 6,144 N(0, 9) draws: 33 values beyond one bf16
        # step, by at most |y| * 2^-25, e.g. y = -5.09: eager -0.0, interpreter -1.5e-7).
        for variant in (0, 1):
            h, q, sx = fp.run_act(y, pre=3, spec=gspec, store_h=True, gelu_variant=variant, out_dtype=torch.bfloat16)
            ref = ops.gelu_eager(y).float()
            close = (h.float() - ref).abs() <= ref.abs() / 128 + y.float().abs() * 2.0 ** -23
            res[f"gelu+quant kernel {grid} {mode} variant {variant}"] = q is not None and bool(close.all()) and \
                fp.same_quantization(fp.pack(q, sx, y.shape, y.dtype, gspec), fp.quantize_eager(h, gspec))
        # The dispatcher: it fuses when a GELU variant is exact on the sampled bf16 inputs, and must then return
        # that kernel's result; it runs the GELU itself (None) only when neither variant is exact.
        act = ops.gelu_quantize(y, gspec)
        exact = ops._gelu_variant(y.device, y.shape[-1])
        if exact is None:
            res[f"gelu+quant dispatch {grid} {mode}"] = act is None
        else:
            h, q, sx = fp.run_act(y, pre=3, spec=gspec, store_h=True, gelu_variant=exact, out_dtype=torch.bfloat16)
            res[f"gelu+quant dispatch {grid} {mode}"] = act is not None and fp.same_quantization(
                act, fp.pack(q, sx, y.shape, y.dtype, gspec))
        res.setdefault("gelu variants exact", []).append(exact)
h, _ = ops.modulate(n, sc, sh, torch.bfloat16)
res["modulate"] = fp.bits_equal(h, ops.modulate_eager(n, sc, sh, torch.bfloat16))
hh, aa = (torch.randn(2, 10, 96, generator=g) * 4).bfloat16(), (torch.randn(2, 10, 96, generator=g) * 4).bfloat16()
res["gated residual"] = fp.bits_equal(ops.gated_residual(hh, aa, sc), ops.gated_residual_eager(hh, aa, sc))
acc = torch.randint(-2**30, 2**30, (20, 48), dtype=torch.int32, generator=g)
sx, ws, b = torch.rand(20, 1, generator=g), torch.rand(1, 48, generator=g), torch.randn(48, generator=g).bfloat16()
for dtype in (torch.bfloat16, torch.float32):
    xr = (torch.randn(1, 10, 4, 16, generator=g) * 4).to(dtype)
    xr[0, 1, 2] = 0
    ang = torch.randn(1, 10, 1, 16, generator=g) * 50
    res[f"rope {dtype}"] = fp.bits_equal(ops.rope(xr, ang.cos(), ang.sin()), ops.rope_eager(xr, ang.cos(), ang.sin()))
res["int8 epilogue"] = fp.bits_equal(fp.int8_epilogue(acc, sx, ws, b), fp.int8_epilogue_eager(acc, sx, ws, b))

# whole tiny model: fused Triton path == eager path == per-linear quantization
from vqx.algorithms.materialize import materialize
from vqx.models.adapter import LayerSelection, quant_targets
from vqx.models.wan.tiny import _transformer, cast_transformer
from vqx.quant.backends import set_backend
from vqx.quant.formats import get_scheme
torch.manual_seed(0)
base = cast_transformer(_transformer(False), torch.bfloat16).eval()
kw = dict(hidden_states=torch.randn(1, 16, 2, 8, 8).bfloat16(), timestep=torch.tensor([500.0]),
          encoder_hidden_states=torch.randn(1, 8, 32).bfloat16(), return_dict=False)
for fmt, backend in (("w8a8", "kernel"), ("fp8", "fake"), ("mxfp4", "fake")):
    m = copy.deepcopy(base)
    materialize(m, quant_targets(m, LayerSelection()), get_scheme(fmt), {})
    set_backend(m, backend)
    with torch.no_grad():
        fused = m(**kw)[0]
        with fp.use_impl("eager"):
            eager = m(**kw)[0]
    res[f"model {fmt} {backend}"] = fp.bits_equal(fused, eager)
res["kernels checked"] = len(fp.report())
print(json.dumps(res))
"""


@pytest.mark.slow  # the Triton interpreter: about a minute on an idle 2-core CPU
def test_triton_kernels_match_the_reference_bit_for_bit():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "VQX_QUANT_IMPL": "triton", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    checked = res.pop("kernels checked")
    assert checked >= 10
    exact = set(res.pop("gelu variants exact"))
    assert len(exact) == 1  # one answer per device and width, remembered
    assert all(res.values()), {k: v for k, v in res.items() if not v}
