"""Quantized attention (attention=...): the emulation against a slow loop reference, the presets' numbers, the
switch that leaves 16-bit attention bit-identical, full-precision steps, and runs that compose it."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import vqx
from vqx.errors import UserError
from vqx.quant.attention import AttentionScheme, attention
from vqx.config.presets import attention_preset
from vqx.quant.attention_plan import AttentionPlan, AttentionRuntime, resolve_steps

from attention_reference import reference_attention

PRESETS = ("sage1", "sage2", "sage2_k_int8_v_fp8", "fp8", "nvfp4")
TINY = {"model": "wan_tiny", "eval": "none", "export": "none", "calib": {"num_prompts": 1, "steps": 2}}


def preset(name: str, **changes) -> AttentionScheme:
    """The scheme the shipped conf/attention/<name>.yaml sets, with ``changes``."""
    return dataclasses.replace(attention_preset(name), **changes)


def qkv(lq=70, lk=150, d=32, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, lq, d, generator=g)
    k = torch.randn(1, 2, lk, d, generator=g) * 2 + 0.5  # an offset the K smoothing removes
    v = torch.randn(1, 2, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def close_in_bf16(got: torch.Tensor, want_fp32: torch.Tensor) -> None:
    """Equal in bf16 but for fp32 accumulation order (which can move a value across a bf16 rounding boundary, or
    a P code across an fp8 one): measured on these inputs, at most 0.16% of the values differ, by at most 0.0043
    of their row's largest |output| (one value, logits in the thousands); allowed: 0.5% of the values, 2**-7 of
    the row's largest."""
    want = want_fp32.to(torch.bfloat16).float()
    got = got.float()
    assert (got != want).float().mean() <= 0.005
    row = want_fp32.abs().amax(dim=-1, keepdim=True)
    assert ((got - want).abs() <= row * 2 ** -7).all()


@pytest.mark.parametrize("small_blocks", [False, True], ids=["preset_blocks", "small_blocks"])
@pytest.mark.parametrize("name", PRESETS)
def test_eager_emulation_equals_the_loop_reference(name, small_blocks):
    """Several scale groups, partial groups and a partial last key tile (small_blocks: 16-token groups, 32-key tiles)."""
    scheme = preset(name, **(dict(block_q=16, block_k=16, block_kv=32, warp_q=8) if small_blocks else {}))
    q, k, v = qkv()
    close_in_bf16(attention(q, k, v, scheme), reference_attention(q, k, v, scheme))


@pytest.mark.parametrize("name", PRESETS)
def test_adversarial_inputs_match_the_reference_and_stay_finite(name):
    scheme = preset(name, block_kv=32)
    q, k, v = qkv(lq=40, lk=96, seed=1)
    cases = {
        "all-equal keys": (q, k[:, :, :1].expand_as(k).contiguous(), v),  # smoothed K is 0: uniform weights
        "one huge logit": (q, k.clone(), v),
        "zero queries": (torch.zeros_like(q), k, v),
        "zero values": (q, k, torch.zeros_like(v)),
        "beyond nvfp4's range": (q * 30, k * 30, v * 1e3),  # block scales saturate at 448 (satfinite), no NaN
    }
    big = cases["one huge logit"][1]
    big[:, :, 77] = q[:, :, :1].float().sign().to(q.dtype).squeeze(2) * 60  # one key aligned with the first query
    for what, (qq, kk, vv) in cases.items():
        got = attention(qq, kk, vv, scheme)
        assert torch.isfinite(got).all(), what
        close_in_bf16(got, reference_attention(qq, kk, vv, scheme))
    # all-equal keys: every query averages the values as the P.V GEMM reads them (what P's rounding leaves equal)
    uniform = attention(q, cases["all-equal keys"][1], v, scheme).float()
    assert torch.allclose(uniform, uniform[:, :, :1].expand_as(uniform))
    assert torch.allclose(uniform[:, :, 0], v.float().mean(dim=2), atol=0.06)
    # the huge logit: the first query reads value 77 (P one-hot up to rounding)
    hot = attention(q, big, v, scheme).float()[:, :, 0]
    assert torch.allclose(hot, v[:, :, 77].float(), atol=0.1 * v.float().abs().max())


def test_presets_differ_where_sageattention_differs():
    """Each knob the presets set changes the numbers (a preset silently equal to another would hide a wiring bug)."""
    q, k, v = qkv(lq=64, lk=256, d=64, seed=2)
    outs = {name: attention(q, k, v, preset(name)) for name in PRESETS}
    for a in PRESETS:
        for b in PRESETS:
            if a < b:
                assert not torch.equal(outs[a], outs[b]), (a, b)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err = {n: ((o.float() - exact).norm() / exact.norm()).item() for n, o in outs.items()}
    # fewer bits, larger error (measured 0.018 sage1, 0.034 sage2, 0.060 fp8, 0.23 nvfp4 on such data)
    assert err["sage1"] < err["sage2"] < err["fp8"] < err["nvfp4"] < 0.5


def test_granularity_groups_follow_the_kernels_layout():
    from vqx.quant.attention import k_groups, q_groups

    s = preset("sage2")
    q = q_groups(32, s)  # per thread: tokens t and t + 8 of a 16-token warp share a scale
    assert q[:16].tolist() == list(range(8)) * 2 and q[16:].tolist() == list(range(8, 16)) * 2
    k = k_groups(256, s)  # 4 scales per 128 keys, token pairs (8i+2t, 8i+2t+1) on scale t
    assert k[:8].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and k[128:136].tolist() == [4, 4, 5, 5, 6, 6, 7, 7]
    assert q_groups(300, preset("sage1")).max() == 2 and k_groups(300, preset("sage1")).max() == 4


def test_bad_scheme_values_are_one_line_errors():
    with pytest.raises(ValueError, match=r"attention.qk='int4' is not valid; valid: int8, fp8, nvfp4"):
        preset("sage1", qk="int4")
    with pytest.raises(ValueError, match="head dim that is a multiple of 16, not 24"):
        attention(*qkv(d=24), preset("nvfp4"))


# ---- steps, sites, the switch -----------------------------------------------------------------------------

def test_full_precision_steps_resolve_names_and_indices():
    assert resolve_steps(["first", "last"], 10) == (0, 9)
    assert resolve_steps([-2, 3, "first", 3], 10) == (0, 3, 8)
    for bad in ("middle", 10, -11, True):
        with pytest.raises(ValueError, match=f"attention.full_precision_steps has {bad!r}; valid: first, last"):
            resolve_steps([bad], 10)


@pytest.mark.parametrize("options,message", [
    ({"attention": "sage3"}, "attention=sage3 is not an option of 'attention'; valid: fp8, none, nvfp4, sage1,"),
    ({"attention": "sage2", "+attention.bits": 4}, "unknown key 'attention.bits'; valid keys of attention: name, qk, pv,"),
    (["attention=sage2", "attention.sites=[self,joint]"], "attention.sites=['self', 'joint'] has unknown site 'joint'; valid: self, cross"),
    (["attention=sage2", "attention.full_precision_steps=[first,50]"], "attention.full_precision_steps has 50; valid"),
    (["attention=sage1", "attention.block_k=12"], "attention.block_k=12 must be a multiple of 8"),
    (["attention=sage1", "attention.pv=fp4"], "attention.pv='fp4' is not valid; valid choices: fp16, fp8, nvfp4"),
])
def test_bad_attention_settings_fail_before_anything_runs(tmp_path, options, message):
    args = options if isinstance(options, list) else [f"{k}={v}" for k, v in options.items()]
    with pytest.raises(UserError) as e:
        vqx.Experiment(*args, run_dir=tmp_path / "run", **TINY)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def _tiny_pipe():
    from vqx.models.wan.tiny import build_tiny_pipeline

    return build_tiny_pipeline("t2v", seed=0, dtype=torch.bfloat16)


def _latents(pipe, steps=4):
    return pipe("a red square moves right", height=32, width=32, num_frames=5, num_inference_steps=steps,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames


def test_inactive_quantized_attention_is_bit_identical_and_steps_switch_it():
    """An installed runtime that is suspended (or at a full-precision step) computes diffusers' attention bit for
    bit; at the other steps every site runs the emulation, once per block, site and guidance branch."""
    from vqx.models.adapter import adapter_for

    pipe = _tiny_pipe()
    want = _latents(pipe)
    plan = AttentionPlan(preset("sage2"), ("self", "cross"), resolve_steps(["first", "last"], 4), 4)
    runtime = AttentionRuntime(plan)
    adapter = adapter_for(pipe.transformer)
    assert runtime.install(adapter, adapter.transformers(pipe)) == 4  # 2 blocks x 2 sites
    runtime.suspended = True
    assert torch.equal(_latents(pipe), want) and runtime.calls == {}
    runtime.suspended = False
    quantized = _latents(pipe)
    assert not torch.equal(quantized, want)
    assert runtime.calls == {"self": 2 * 2 * 2, "cross": 2 * 2 * 2}  # steps 1, 2 x 2 branches x 2 blocks
    runtime.calls.clear()
    assert torch.equal(_latents(pipe), quantized)  # a new trajectory restarts the step count
    assert runtime.calls == {"self": 8, "cross": 8}


def test_self_site_only_leaves_cross_attention_16_bit():
    from vqx.models.adapter import adapter_for

    pipe = _tiny_pipe()
    runtime = AttentionRuntime(AttentionPlan(preset("sage1"), ("self",), (), 4))
    adapter = adapter_for(pipe.transformer)
    assert runtime.install(adapter, adapter.transformers(pipe)) == 2
    _latents(pipe)
    assert runtime.calls == {"self": 4 * 2 * 2}
    procs = [type(b.attn2.processor).__name__ for b in pipe.transformer.blocks]
    assert procs == ["WanAttnProcessor", "WanAttnProcessor"]


# ---- runs ---------------------------------------------------------------------------------------------------

def test_attention_only_and_with_linears_compose_end_to_end(tmp_path):
    """format=none + attention (attention-only), and attention with a linear format and algorithm: the run reports
    the plan, the quantized attention runs in evaluation, and the videos move away from attention=none's."""
    base = {**TINY, "eval": "video", "cache_dir": str(tmp_path / "cache")}
    ev = ["eval.num_samples=1", "eval.noise_floor=none", "eval.save_videos=false"]
    runs = {}
    for label, options in {"none": {"format": "none", "algorithm": "rtn"},
                           "attn_only": {"format": "none", "algorithm": "rtn", "attention": "nvfp4"},
                           "linears": {"format": "w8a8", "algorithm": "smoothquant"},
                           "both": {"format": "w8a8", "algorithm": "smoothquant", "attention": "sage2",
                                    "attention.full_precision_steps": "[first]"}}.items():
        args = ev + [f"{k}={v}" for k, v in options.items() if "." in k]
        opts = {k: v for k, v in options.items() if "." not in k}
        runs[label] = vqx.Experiment(*args, run_dir=tmp_path / label, **{**base, **opts}).run()
    assert runs["none"]["attention"] == {"name": "none"} and runs["none"]["lpips"] == 0.0
    assert runs["attn_only"]["attention"]["name"] == "nvfp4" and runs["attn_only"]["quantized_layers"] == 0
    assert runs["attn_only"]["lpips"] > 0 and runs["attn_only"]["psnr"] < math.inf
    both = runs["both"]["attention"]
    assert both["name"] == "sage2" and both["full_precision_steps"] == [0] and both["sites"] == ["self", "cross"]
    assert runs["both"]["lpips"] != runs["linears"]["lpips"]


@pytest.mark.parametrize("attention,sites,want", [
    ("sage2", "[self,cross]", {"self_attn_1_type": "sage_attn2", "cross_attn_1_type": "sage_attn2"}),
    ("nvfp4", "[self]", {"self_attn_1_type": "sage_attn3"}),
    ("fp8", "[self,cross]", {}),
])
def test_export_fragments_name_lightx2v_attention_types(tmp_path, attention, sites, want):
    """The run-config fragments select lightx2v's kernel for the quantized sites; LIGHTX2V.md says which GPUs run
    those numbers, or that lightx2v has no kernel (fp8); the export still verifies (it records 16-bit attention)."""
    import json

    exp = vqx.Experiment(f"attention={attention}", f"attention.sites={sites}", "attention.full_precision_steps=[last]",
                         run_dir=tmp_path / "run", **{**TINY, "algorithm": "rtn", "export": "lightx2v"})
    q = exp.quantize()
    summary = exp.export(q)
    assert summary["verify"]["ok"]
    out = tmp_path / "run" / "export"
    for name in ("lightx2v_config.json", "lightx2v_config_pre2025-10.json"):
        body = json.loads((out / name).read_text())
        assert {k: v for k, v in body.items() if k.endswith("_attn_1_type") or k.endswith("_attn_2_type")} == want
    notes = (out / "LIGHTX2V.md").read_text()
    assert f"## Attention (vqx attention={attention})" in notes
    assert "lightx2v has no per-step attention type" in notes
    if attention == "fp8":
        assert "Not set in the fragments: lightx2v has no FP8 attention kernel" in notes
    if sites == "[self]":
        assert "vqx kept the cross attention 16-bit" in notes


_FUSED_CHECK = """
import json, torch
from dataclasses import replace
from vqx.quant.attention_kernel import compare, prep_mismatches
from vqx.config.presets import attention_preset
out = {}
schemes = {name: attention_preset(name) for name in ("sage1", "sage2", "sage2_k_int8_v_fp8", "fp8", "nvfp4")}
# group periods that are no power of two: the prep's two-pass fallback
schemes["periods_not_pow2"] = replace(schemes["sage2"], warp_q=24, block_k=40)
schemes["blocks_not_pow2"] = replace(schemes["fp8"], block_q=48, block_k=80)
schemes["nvfp4_tiles_of_32"] = replace(schemes["nvfp4"], block_kv=32)  # P's blocks in key order (no permutation)
# Q less its per-128-token means as the prep reads it (one pass; two passes), and the scores' bias
schemes["sage2_smooth_q"] = replace(schemes["sage2"], smooth_q=True)
schemes["smooth_q_blocks_not_pow2"] = replace(schemes["fp8"], smooth_q=True, block_q=48)
for name, s in schemes.items():
    ok, detail = compare(s, 16, torch.bfloat16, torch.device("cpu"))
    out[name] = [ok, detail["max_rel_diff"], prep_mismatches(s, 16, torch.bfloat16, torch.device("cpu"))]
# nvfp4's TMA kernel, one program and warp-specialized (the interpreter runs the same program), with the bias or
# with only the padding's -inf
tma = {"nvfp4_tma": (schemes["nvfp4"], (128, 4, 2, "tma")), "nvfp4_tma_ws": (schemes["nvfp4"], (64, 4, 2, "tma_ws")),
       "nvfp4_tma_no_smooth_q": (replace(schemes["nvfp4"], smooth_q=False), (128, 8, 3, "tma_ws"))}
for name, (s, config) in tma.items():  # the prep writes K, V and the bias in the kernel's key tiles
    ok, detail = compare(s, 16, torch.bfloat16, torch.device("cpu"), config)
    out[name] = [ok, detail["max_rel_diff"], prep_mismatches(s, 16, torch.bfloat16, torch.device("cpu"))]
print(json.dumps(out))
"""


def test_fused_kernel_matches_the_eager_emulation_on_adversarial_inputs():
    """The fused path (through Triton's CPU interpreter, fp32 GEMM operands) against the eager path on the inputs
    of its own pre-use check: the prep's int8 / fp8 codes and scales equal the eager quantizer's bit for bit (from
    q/k/v strided as diffusers passes them), also for scale groups that are no power of two (the prep's two-pass
    fallback); all-equal keys, one huge logit (presets), zero queries and values, large magnitudes give equal
    outputs; random inputs differ by accumulation order only (measured at most 3.3e-3 of a row's largest output,
    sage1's fp16 tile sums; the check allows 2**-6, 2**-7 for nvfp4)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "VQX_QUANT_IMPL": "triton", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _FUSED_CHECK], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (ok, worst, unequal) in res.items():
        assert ok, (name, worst)
        assert not unequal, (name, unequal)
        exact = ("all_equal_keys", "zero_queries", "zero_values") + (
            () if "pow2" in name or "smooth_q" in name else ("one_huge_logit",))
        assert all(worst[case] == 0.0 for case in exact), name
        assert worst["random"] <= 4e-3, name
    assert set(res) >= {"periods_not_pow2", "blocks_not_pow2", "nvfp4_tiles_of_32", "sage2_smooth_q", "nvfp4_tma",
                        "nvfp4_tma_ws", "nvfp4_tma_no_smooth_q"}


def test_key_order_puts_each_key_where_the_kernel_reads_it():
    """nvfp4's TMA kernel reads column c of a key tile as key 8j + 2b + e -> 16b + 2j + e (`_tile_keys`): key_order
    stores K, V (keys on axis -2) and the bias (axis -1) so, padded to whole tiles with the given value."""
    from vqx.quant.attention_kernel import key_order

    for lk, block_n in ((333, 128), (320, 64), (256, 128), (40, 64), (129, 128)):
        x = torch.randn(2, 3, lk, 5)
        lk_pad = -(-lk // block_n) * block_n
        padded = torch.full((2, 3, lk_pad, 5), float("-inf"))
        padded[:, :, :lk] = x
        c = torch.arange(lk_pad)
        m = c % 64
        key = c - m + 16 * ((m // 2) % 4) + 2 * (m // 8) + m % 2
        assert torch.equal(key_order(x, block_n, -2, float("-inf")), padded[:, :, key])
        assert torch.equal(key_order(x.transpose(-1, -2), block_n, -1, float("-inf")), padded[:, :, key].transpose(-1, -2))
        # K smoothed as it is laid out: the input dtype's subtraction, the padding keys left at the pad value
        xb, mean = x.bfloat16(), x.mean(dim=2, keepdim=True).bfloat16()
        smoothed = torch.zeros(2, 3, lk_pad, 5, dtype=torch.bfloat16)
        smoothed[:, :, :lk] = xb - mean
        assert torch.equal(key_order(xb, block_n, -2, minus=mean), smoothed[:, :, key])


def test_kernel_variants_that_cannot_run_a_scheme_are_one_line_errors():
    from vqx.config.presets import attention_preset
    from vqx.quant.attention_kernel import kernel_config, kernel_inputs, launch

    with pytest.raises(ValueError, match=r"'tma_ws' does not run int8 Q.K / fp8 P.V .* valid are pointers, tma, tma_ws"):
        launch({}, attention_preset("sage2"), (128, 4, 2, "tma_ws"))
    with pytest.raises(ValueError, match=r"'tmaa' does not run nvfp4"):
        launch({}, attention_preset("nvfp4"), (128, 4, 2, "tmaa"))
    q = torch.zeros(1, 1, 64, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"key_tiles: .* not int8 / fp8 with 128-key tiles"):
        kernel_inputs(q, q, q, attention_preset("sage2"), key_tiles=True)
    with pytest.raises(ValueError, match=r"the pointer kernel reads K, V and the bias in key order, not in the TMA"):
        launch({"key_tiles": True}, attention_preset("nvfp4"), (128, 8, 3, "pointers"))
    assert kernel_config(attention_preset("sage2"))[3] == "pointers"


def test_nvfp4_runs_the_warp_specialized_kernel_where_triton_compiles_it_else_the_pointer_kernel(monkeypatch):
    """CONFIGS lists nvfp4's warp-specialized TMA kernel first, for Triton >= 3.7 only (3.6 cannot compile it); the
    fused path keeps the first config that compiles and passes its check, and reports why it passed over others."""
    import vqx.quant.attention_kernel as ak
    from vqx.config.presets import attention_preset

    nvfp4 = attention_preset("nvfp4")
    monkeypatch.setattr(ak, "TRITON_VERSION", (3, 7))
    assert [c[3] for c in ak.kernel_configs(nvfp4)] == ["tma_ws", "pointers"]
    monkeypatch.setattr(ak, "TRITON_VERSION", (3, 6))
    assert ak.kernel_configs(nvfp4) == ((128, 8, 3, "pointers"),)
    assert ak.kernel_configs(attention_preset("sage2")) == ((64, 4, 3, "pointers"),)
    monkeypatch.setattr(ak, "TRITON_VERSION", (3, 7))

    tried = []

    def fake_compare(s, d, dtype, device, config=None, fp8_qk_acc=None):
        tried.append(config[3])
        if config[3] == "tma_ws":
            raise RuntimeError("PassManager::run failed\n<IR>")
        return True, {"max_rel_diff": {"random": 0.0}, "tolerance": 2 ** -7}

    monkeypatch.setattr(ak, "compare", fake_compare)
    key = ("qattn-test", "cpu", nvfp4, 16, torch.bfloat16)
    ok, detail = ak._choose(key, nvfp4, 16, torch.bfloat16, "cpu")
    assert ok and tried == ["tma_ws", "pointers"] and ak._CHOSEN.pop(key) == (128, 8, 3, "pointers")
    assert detail["launch_config"] == [128, 8, 3, "pointers"]
    assert detail["skipped"] == {"128,4,2,tma_ws": "RuntimeError: PassManager::run failed"}
    monkeypatch.setattr(ak, "compare", lambda *a, **k: (False, {"max_rel_diff": {"random": 1.0}, "tolerance": 0.0}))
    ok, detail = ak._choose(key, nvfp4, 16, torch.bfloat16, "cpu")
    assert not ok and set(detail["skipped"]) == {"128,4,2,tma_ws", "128,8,3,pointers"} and key not in ak._CHOSEN
    # an older Triton: the report says which faster kernel a newer one would run
    monkeypatch.setattr(ak, "TRITON_VERSION", (3, 6))
    monkeypatch.setattr(ak.triton, "__version__", "3.6.0")
    monkeypatch.setattr(ak, "compare", fake_compare)
    ok, detail = ak._choose(key, nvfp4, 16, torch.bfloat16, "cpu")
    assert ok and ak._CHOSEN.pop(key) == (128, 8, 3, "pointers")
    assert detail["skipped"] == {"128,4,2,tma_ws": "needs Triton >= 3.7, this is 3.6.0"}


def test_eval_gemm_kernel_runs_sageattentions_kernel_where_installed_and_reports_the_difference(tmp_path, monkeypatch):
    """eval.gemm=kernel with attention=sage1: the sageattention package's SageAttention1 Triton kernel runs (here a
    stand-in module that perturbs the emulation by a known amount) and metrics.json reports its difference to the
    emulation per site; without the package the emulation runs and the report says why."""
    import importlib.machinery
    import importlib.metadata
    import sys
    import types

    from vqx.quant.attention import attention as emulated

    calls = []

    def sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout, smooth_k):
        assert tensor_layout == "NHD" and smooth_k is True
        calls.append(q.shape)
        out = emulated(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), preset("sage1")).transpose(1, 2)
        return out * 1.01  # a kernel 1% off the emulation

    options = {**TINY, "format": "none", "algorithm": "rtn", "eval": "video", "cache_dir": str(tmp_path / "cache")}
    args = ["attention=sage1", "eval.gemm=kernel", "eval.num_samples=1", "eval.noise_floor=none", "eval.save_videos=false"]
    module = types.ModuleType("sageattention")
    module.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)
    module.sageattn_qk_int8_pv_fp16_triton = sageattn_qk_int8_pv_fp16_triton
    monkeypatch.setitem(sys.modules, "sageattention", module)
    kernel = vqx.Experiment(*args, run_dir=tmp_path / "with", **options).run()["attention"]["kernel"]
    assert kernel["used"] and kernel["why_not"] is None and calls
    assert set(kernel["relative_difference_to_emulation"]) == {"self", "cross"}
    assert all(abs(d - 0.01) < 2e-3 for d in kernel["relative_difference_to_emulation"].values())  # bf16 rounding

    # SageAttention 1.x (PyPI's release): its sageattn is that kernel, and it writes into K (it subtracts K's mean
    # in place; this stand-in zeroes it, so the comparison below fails unless vqx hands it a copy)
    def sageattn(q, k, v, tensor_layout, smooth_k):
        out = sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout=tensor_layout, smooth_k=smooth_k)
        k.zero_()
        return out

    v1 = types.ModuleType("sageattention")
    v1.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)
    v1.sageattn = sageattn
    monkeypatch.setitem(sys.modules, "sageattention", v1)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0.6" if name == "sageattention" else "0")
    calls.clear()
    kernel = vqx.Experiment(*args, run_dir=tmp_path / "v1", **options).run()["attention"]["kernel"]
    assert kernel["used"] and calls  # the emulation of the first call saw K as diffusers passed it
    assert all(abs(d - 0.01) < 2e-3 for d in kernel["relative_difference_to_emulation"].values())

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.2.0")  # a 2.x without the Triton kernel
    kernel = vqx.Experiment(*args, run_dir=tmp_path / "v2", **options).run()["attention"]["kernel"]
    assert not kernel["used"] and "sageattention 2.2.0 has no sageattn_qk_int8_pv_fp16_triton" in kernel["why_not"]

    monkeypatch.setitem(sys.modules, "sageattention", None)  # import fails
    kernel = vqx.Experiment(*args, run_dir=tmp_path / "without", **options).run()["attention"]["kernel"]
    assert not kernel["used"] and "the sageattention package is not importable" in kernel["why_not"]


def test_the_run_summary_names_the_quantized_attention():
    from vqx.track.run_log import summary_lines

    base = {"format": "w8a8", "algorithm": "smoothquant", "model": "wan_mini", "quantized_layers": 40}
    assert "w8a8 smoothquant + attention=sage2 on wan_mini" in summary_lines({**base, "attention": {"name": "sage2"}}, ".")[0]
    assert "w8a8 smoothquant on wan_mini" in summary_lines({**base, "attention": {"name": "none"}}, ".")[0]


def _f32_neighbours(g, n):
    """g and its n nearest fp32 neighbours on each side, [2n + 1, ...]."""
    out = [g]
    for direction in (np.inf, -np.inf):
        y = g
        for _ in range(n):
            y = np.nextafter(y, np.float32(direction))
            out.append(y)
    return np.stack(out)


def _rn32(exact_hi, exact_lo):
    """The fp32 nearest to exact_hi + exact_lo (float64 arrays whose sum is exact; no ties occur in these uses)."""
    g = (exact_hi + exact_lo).astype(np.float32)
    cands = _f32_neighbours(g, 1).astype(np.float64)
    dist = np.sort(np.abs((cands - exact_hi) - exact_lo), axis=0)
    assert (dist[0] < dist[1]).all()  # no tie, so no ties-to-even to decide
    return cands[np.argmin(np.abs((cands - exact_hi) - exact_lo), axis=0), np.arange(g.size)].astype(np.float32)


def test_nvfp4_scale_division_and_reciprocal_steps_equal_ieee_division():
    """The kernel's _div6 and _reciprocal_e4m3 (vqx.quant.attention_kernel, GPU branch) as fp32 math with true fmas:
    q = RN(x * RN(1/6)), then RN(q + RN(x - 6q) * RN(1/6)), equals RN(x / 6) for every fp32 significand (x in [1, 2));
    r = RN(r0 + RN(1 - s r0) r0) equals RN(1 / s) for each of e4m3's 8 significands from any r0 within 2 ulp (the
    accuracy of div.full.f32). The plain product with RN(1/6) is not enough: it differs for a third of them."""
    f32, f64 = np.float32, np.float64
    x = np.arange(0x3F800000, 0x40000000, dtype=np.uint32).view(f32)
    z = f32(1) / f32(6)
    xd = x.astype(f64)
    q = (xd * f64(z)).astype(f32)  # exact product in f64, rounded once
    rem = xd - 6 * q.astype(f64)  # the fma's exact remainder
    assert np.array_equal(rem.astype(f32).astype(f64), rem)
    got = _rn32(q.astype(f64), rem * f64(z))  # rem * z is exact in f64 (24 x 24 bits)
    want = _rn32(xd / 6, np.zeros_like(xd))
    exact = (np.abs(xd - 6 * want.astype(f64))[None] <= np.abs(xd - 6 * _f32_neighbours(want, 1).astype(f64))).all(0)
    assert exact.all()  # want is the nearest fp32 to x / 6
    assert np.array_equal(got, want)
    assert np.count_nonzero(q != want) > len(x) // 4
    for m in range(8, 16):
        s = np.full(5, m / 8, dtype=f32)
        want = f32(1) / s  # numpy's fp32 division is IEEE's
        r0 = _f32_neighbours(want[:1], 2)[:, 0]
        e = _rn32(1 - s.astype(f64) * r0.astype(f64), np.zeros(5))  # exact in f64 (4 x 24 bits, then near 1)
        assert np.array_equal(_rn32(r0.astype(f64), e.astype(f64) * r0.astype(f64)), want)
