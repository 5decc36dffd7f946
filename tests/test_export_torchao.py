"""export=torchao: a diffusers folder that diffusers' own from_pretrained loads (TorchAO quantizer), holding vqx's
int8 codes, scales and run-time smoothing exactly; refusals before any model is built."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from omegaconf import OmegaConf
from torchao.quantization import Int8Tensor

import vqx.plugins  # noqa: F401  (registers the exporters)
from vqx.algorithms.materialize import materialize
from vqx.errors import UserError
from vqx.export import diffusers_torchao as tao
from vqx.export.mutations import rehash
from vqx.export.verify import verify_export
from vqx.models.adapter import LayerSelection, quant_targets
from vqx.models.wan.layers import input_groups
from vqx.models.wan.tiny import build_tiny_pipeline
from vqx.quant.formats import get_scheme, uniform
from vqx.stages import EXPORTERS, RunState

RUNTIME_FOLDS = ("affine_norm1", "affine_norm3")


def quantized_state(fmt_name, out, smooth=True, seed=0):
    """A tiny pipeline quantized in place (``smooth``: a random run-time smoothing vector per block and runtime group,
    its weight columns multiplied by s as the algorithms do) and the RunState an export=torchao run hands over."""
    pipe = build_tiny_pipeline("t2v", seed=seed)
    tr = pipe.transformer
    runtime = {}
    g = torch.Generator().manual_seed(seed + 1)
    for i, block in enumerate(tr.blocks if smooth else []):
        runtime[i] = {}
        for group in input_groups(False):
            if group.fold in RUNTIME_FOLDS:
                s = torch.exp(torch.randn(block.norm2.normalized_shape[0], generator=g) * 0.5)
                for name in group.linears:
                    lin = block.get_submodule(name)
                    lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)
                runtime[i][group.fold] = s
    targets = quant_targets(tr, LayerSelection())
    q = materialize(tr, targets, get_scheme(fmt_name), {}, runtime)
    cfg = OmegaConf.create({"model": {"name": "wan_tiny", "task": "t2v", "dtype": "bfloat16", "family": "wan"},
                            "algorithm": {"name": "test"}, "format": {"name": fmt_name},
                            "export": {"name": tao.KIND, "dir": str(out), "overwrite": False, "verify": True}})
    return RunState(cfg, out.parent, pipe, uniform(get_scheme(fmt_name)), targets, q, runtime)


def call_inputs(transformer, seed=0):
    c = transformer.config
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, c.in_channels, 3, 16, 16, generator=g).to(torch.bfloat16), torch.tensor([700]),
            torch.randn(1, 16, c.text_dim, generator=g).to(torch.bfloat16))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fmt_name", ["w8a8", "w8a16"])
def test_diffusers_loads_vqxs_codes_scales_and_runtime_smoothing(tmp_path, fmt_name):
    out = tmp_path / "export"
    state = quantized_state(fmt_name, out)
    summary = EXPORTERS[tao.KIND].export(state)
    assert summary["verify"] == {"ok": True, "compared_linears": len(state.quantized)}
    loaded = WanTransformer3DModel.from_pretrained(str(out / "transformer"), torch_dtype=torch.bfloat16)  # diffusers' call
    smoothed = 0
    for name, q in state.quantized.items():
        w = loaded.get_submodule(name).weight
        assert isinstance(w, Int8Tensor) and torch.equal(w.qdata, q.weight_codes.to(torch.int8)), name
        assert torch.equal(w.scale.flatten(), q.weight_scale.flatten()), name
        assert (w.act_quant_kwargs is None) == (fmt_name == "w8a16"), name
        if q.input_smooth_inv is None:
            assert w.act_pre_scale is None, name
        else:
            smoothed += 1
            assert torch.equal(w.act_pre_scale.flatten(), q.input_smooth_inv.to(w.act_pre_scale.dtype)), name
            assert w.act_pre_scale.dtype == (torch.float32 if fmt_name == "w8a8" else torch.bfloat16), name
    assert smoothed == 4 * len(state.pipe.transformer.blocks)  # to_q, to_k, to_v, ffn.net.0.proj of every block
    # What it computes: vqx's evaluated model up to torchao's own rounding (activation scale absmax / 127.5, the weight
    # scale applied after the 16-bit product, 1/s in fp32 or bf16). Measured on this model (seeds 0-2): 4.9-5.2e-3
    # (w8a8), 3.9-4.2e-3 (w8a16); bounds about 2x the largest. Without 1/s (the smoothing lost) the output is off by
    # 0.067-0.078, so the bounds can tell.
    x = call_inputs(loaded)
    with torch.no_grad():
        got, want = loaded(*x).sample, state.pipe.transformer(*x).sample
        assert rel(got, want) < {"w8a8": 1.0e-2, "w8a16": 8.5e-3}[fmt_name]
        for m in loaded.modules():
            if isinstance(getattr(m, "weight", None), Int8Tensor):
                m.weight.act_pre_scale = None
        assert rel(loaded(*x).sample, want) > 0.035


def test_the_export_check_catches_a_code_a_scale_or_a_smoothing_vector_that_differs(tmp_path):
    out = tmp_path / "export"
    state = quantized_state("w8a8", out)
    EXPORTERS[tao.KIND].export(state)
    assert tao.compare_loaded(out, state) == []
    name, q = next((n, q) for n, q in state.quantized.items() if q.input_smooth_inv is not None)
    for mutate, expected in [(lambda: q.weight_codes.view(-1)[:1].add_(1), "int8 codes differ"),
                             (lambda: q.weight_scale.mul_(1.001), "scales differ"),
                             (lambda: q.input_smooth_inv.mul_(1.001), "run-time smoothing (act_pre_scale) differs")]:
        saved = (q.weight_codes.clone(), q.weight_scale.clone(), q.input_smooth_inv.clone())
        mutate()
        assert f"{name}: {expected}" in tao.compare_loaded(out, state)
        q.weight_codes.copy_(saved[0]), q.weight_scale.copy_(saved[1]), q.input_smooth_inv.copy_(saved[2])
    assert tao.compare_loaded(out, state) == []


def test_verify_export_loads_the_folder_and_says_what_is_wrong(tmp_path):
    out = tmp_path / "export"
    EXPORTERS[tao.KIND].export(quantized_state("w8a8", out, smooth=False))
    report = verify_export(out)
    assert report.ok and report.info["quantized_linears"] == 10 * 2, report.problems  # 10 linears in each of 2 blocks
    config = json.loads((out / "transformer" / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (out / "transformer" / "config.json").write_text(json.dumps(config))
    rehash(out)
    report = verify_export(out)
    assert report.problems == ["transformer/config.json: quantization_config.quant_method='bitsandbytes', expected 'torchao'"]


@pytest.mark.parametrize("args,message", [
    (["export=torchao", "format=fp8"], "export=torchao cannot write format=fp8: torchao has no tensor for scheme fp8; "
                                       "formats it writes: w8a8, w8a16"),
    (["export=torchao", "model.dtype=float32"], "export=torchao needs model.dtype=bfloat16"),
    (["export=dequantized"], "export=dequantized cannot hold run-time smoothing: algorithm=smoothquant_gptq may smooth "
                             "self_attn_in, ffn_in"),
], ids=["format", "dtype", "dequantized-runtime-smoothing"])
def test_refused_in_one_line_before_any_model_is_built(vqx_run_in_process, tmp_path, args, message):
    run_dir = tmp_path / "run"
    r = vqx_run_in_process([*args, f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not run_dir.exists()


def test_missing_torchao_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(tao, "torchao_version", lambda: None)
    cfg = OmegaConf.create({"model": {"dtype": "bfloat16"}, "format": {"name": "w8a8"}, "export": {"dir": None}})
    with pytest.raises(UserError, match=r"^export=torchao needs torchao >= 0.16 \(it is not installed\); "
                                        r"pip install 'vqx\[torchao\]'"):
        tao.check(cfg)


def test_the_default_recipe_runs_with_export_torchao(vqx_run_in_process, tmp_path):
    """SmoothQuant alpha=auto leaves run-time smoothing where it lowers the block error; the run exports, checks the
    folder diffusers loads against the evaluated model, and records it."""
    run_dir = tmp_path / "run"
    r = vqx_run_in_process(["export=torchao", "eval=none", "logger=none", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["export"]["kind"] == "torchao" and metrics["export"]["verify"]["ok"]
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["torchao_config"] == "Int8DynamicActivationInt8WeightConfig" and manifest["dtype"] == "bfloat16"
    assert verify_export(run_dir / "export").ok
