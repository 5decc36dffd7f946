"""export=lightx2v / export=dequantized and `vqx verify-export`: the checkpoint lightx2v reads, proven on CPU."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import vqx.plugins  # noqa: F401  (registers the exporters)
from vqx.algorithms.materialize import materialize
from vqx.errors import UserError
from vqx.export import lightx2v as lx
from vqx.export.lightx2v_reference import REFERENCE_FILE
from vqx.export.mutations import LINEARS, MUTATIONS, bias_zeroed, mutate, rehash, scales_1pct
from vqx.export.verify import DEFAULT_TOLERANCE, verify_export
from vqx.models.adapter import LayerSelection, quant_targets
from vqx.models.wan.layers import diffusers_key, input_groups, native_key
from vqx.models.wan.tiny import build_tiny_pipeline
from vqx.quant.formats import SCHEMES, format_from_config, get_scheme, uniform
from vqx.stages import EXPORTERS, RunState

# Each shipped format option's rules, as `format=<name>` composes them.
FORMAT_RULES = {p.stem: OmegaConf.to_container(OmegaConf.load(p).rules)
                for p in sorted((Path(__file__).resolve().parents[1] / "conf" / "format").glob("*.yaml"))}

ROOT = Path(__file__).resolve().parents[1]
FMT = {"int8": "w8a8", "fp8": "fp8"}
CODE_DTYPE = {"w8a8": torch.int8, "fp8": torch.float8_e4m3fn}


def quantized(task, fmt_name, smooth, seed=0):
    """A tiny pipeline quantized in place; with ``smooth``, a random runtime smoothing per block (weight
    columns of the affine_norm1/3 groups multiplied by s, as the algorithms do)."""
    pipe = build_tiny_pipeline(task, seed=seed)
    tr = pipe.transformer
    runtime = {}
    if smooth:
        g = torch.Generator().manual_seed(seed + 1)
        for i, block in enumerate(tr.blocks):
            runtime[i] = {}
            for group in input_groups(task == "i2v"):
                if group.fold not in ("affine_norm1", "affine_norm3"):
                    continue
                s = torch.exp(torch.randn(block.norm2.normalized_shape[0], generator=g) * 0.5)
                for name in group.linears:
                    lin = block.get_submodule(name)
                    lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)
                runtime[i][group.fold] = s
    fmt = uniform(get_scheme(fmt_name))
    targets = quant_targets(tr, LayerSelection())
    q = materialize(tr, targets, get_scheme(fmt_name), {}, runtime)
    return pipe, fmt, targets, q, runtime


def run_cfg(task, fmt_name, out, **export):
    return OmegaConf.create({
        "model": {"name": f"wan_tiny{'_i2v' if task == 'i2v' else ''}", "task": task, "dtype": "bfloat16"},
        "algorithm": {"name": "test"}, "format": {"name": fmt_name, "skip_first_blocks": 0, "skip_last_blocks": 0,
                                                  "skip_patterns": [], "rules": FORMAT_RULES[fmt_name]},
        "export": {"name": "lightx2v", "dir": str(out), "layout": "single", "dtype": "bfloat16", "overwrite": False,
                   "verify": True, "verify_tolerance": DEFAULT_TOLERANCE, "verify_blocks": None, **export},
    })


def do_export(model, out, kind="lightx2v", **export):
    pipe, fmt, targets, q, runtime = model
    task = "i2v" if pipe.transformer.blocks[0].attn2.add_k_proj is not None else "t2v"
    cfg = run_cfg(task, fmt.name, out, **export)
    cfg.export.name = kind
    return EXPORTERS[kind].export(RunState(cfg, out.parent, pipe, fmt, targets, q, runtime))


def tensors_of(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def t2v_int8_smooth():
    return quantized("t2v", "w8a8", smooth=True)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(task, fmt_name, smooth):
        key = (task, fmt_name, smooth)
        if key not in cache:
            cache[key] = quantized(task, fmt_name, smooth)
        return cache[key]

    return get


# ---- the contract ------------------------------------------------------------------------------------

def contract_keys(i2v, layers, smoothing):
    """lightx2v-contract.md §1-§3 written out by hand (not derived from vqx's tables)."""
    linears = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"] + (["cross_attn.k_img", "cross_attn.v_img"] if i2v else [])
    floats = ["modulation", "self_attn.norm_q.weight", "self_attn.norm_k.weight", "norm3.weight", "norm3.bias",
              "cross_attn.norm_q.weight", "cross_attn.norm_k.weight"] + (["cross_attn.norm_k_img.weight"] if i2v else [])
    smooth = [f"{v}.{p}" for v in ("affine_norm1", "affine_norm3") for p in ("weight", "bias")] if smoothing else []
    keys = {f"blocks.{i}.{n}.{p}" for i in range(layers) for n in linears for p in ("weight", "weight_scale", "bias")}
    keys |= {f"blocks.{i}.{n}" for i in range(layers) for n in floats + smooth}
    mods = ["patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
            "time_projection.1", "head.head"] + (["img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4"] if i2v else [])
    keys |= {f"{m}.{p}" for m in mods for p in ("weight", "bias")} | {"head.modulation"}
    return keys, linears


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_keys_dtypes_and_config_follow_the_contract(models, tmp_path, task):
    model = models(task, "w8a8", True)
    out = tmp_path / "export"
    summary = do_export(model, out)
    tr = model[0].transformer
    i2v = task == "i2v"
    t = tensors_of(out)
    keys, linears = contract_keys(i2v, 2, smoothing=True)
    assert set(t) == keys
    assert not [k for k in t if any(d in k for d in ("attn1", "attn2", "to_q", "to_out", "condition_embedder",
                                                     "scale_shift_table", "proj_out", "ffn.net"))]
    for i in range(2):
        for n in linears:
            p = f"blocks.{i}.{n}"
            w, s, b = t[f"{p}.weight"], t[f"{p}.weight_scale"], t[f"{p}.bias"]
            assert w.dtype == torch.int8 and w.is_contiguous() and w.dim() == 2
            assert s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
            assert torch.equal(s.to(torch.bfloat16).float(), s) and (s > 0).all()
            assert b.dtype == torch.bfloat16 and b.shape == (w.shape[0],)
        for v in ("affine_norm1", "affine_norm3"):
            assert t[f"blocks.{i}.{v}.weight"].dtype == torch.float32 and t[f"blocks.{i}.{v}.weight"].shape == (32,)
        # native norm3 is the (folded) diffusers norm2, kept in fp32 like the evaluated model keeps it
        assert torch.equal(t[f"blocks.{i}.norm3.weight"], tr.blocks[i].norm2.weight)
    # what diffusers keeps in fp32 (_keep_in_fp32_modules), written out by hand: exported in fp32, bit for bit
    kept = {k for k in t if k.startswith(("time_embedding.", "head.modulation", "img_emb.proj.0.", "img_emb.proj.4."))
            or k.endswith((".modulation", ".norm3.weight", ".norm3.bias"))}
    assert len(kept) == 4 + 1 + 2 * 3 + (4 if i2v else 0)
    state = {native_key(k): v for k, v in tr.state_dict().items() if "weight_codes" not in k and "input_smooth" not in k}
    for k in kept:
        assert t[k].dtype == torch.float32 and torch.equal(t[k], state[k]), k
    others = [k for k in t if not k.endswith(("weight_scale",)) and "affine_norm" not in k and t[k].is_floating_point()
              and t[k].dtype != torch.float8_e4m3fn and k not in kept]
    assert others and all(t[k].dtype == torch.bfloat16 for k in others)
    assert t["blocks.0.ffn.0.weight"].shape == (64, 32) and t["blocks.0.ffn.2.weight"].shape == (32, 64)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {"_class_name": "WanModel", "model_type": task, "dim": 32, "ffn_dim": 64, "num_heads": 2,
                   "num_layers": 2, "in_dim": 36 if i2v else 16, "out_dim": 16, "freq_dim": 32, "text_len": 512,
                   "eps": 1e-6, "quant_method": "advanced_ptq"}
    run = json.loads((out / "lightx2v_config.json").read_text())
    assert run == {"dit_quantized": True, "dit_quant_scheme": "int8-vllm", "dit_quantized_ckpt": str(out),
                   "quant_method": "advanced_ptq"}
    legacy = json.loads((out / "lightx2v_config_pre2025-10.json").read_text())
    assert legacy["mm_config"] == {"mm_type": "W-int8-channel-sym-A-int8-channel-sym-dynamic-Vllm"}
    assert "int8-torchao" in (out / "LIGHTX2V.md").read_text()
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "w8a8" and m["algorithm"] == "test" and m["vqx_version"] and m["run_config"]["format"]["name"] == "w8a8"
    assert sum(f.get("tensors", 0) for f in m["files"].values()) == len(t) == summary["tensors"]
    assert summary["verify"]["ok"] and summary["advanced_ptq"]


def test_no_smoothing_means_no_vectors_and_no_flag(models, tmp_path):
    out = tmp_path / "export"
    do_export(models("t2v", "fp8", False), out, dtype="float32")
    t = tensors_of(out)
    keys, _ = contract_keys(False, 2, smoothing=False)
    assert set(t) == keys
    assert "quant_method" not in json.loads((out / "config.json").read_text())
    assert t["blocks.0.self_attn.q.weight"].dtype == torch.float8_e4m3fn
    assert t["blocks.0.modulation"].dtype == torch.float32 and t["head.head.bias"].dtype == torch.float32
    assert json.loads((out / "lightx2v_config.json").read_text())["dit_quant_scheme"] == "fp8-vllm"


def test_spread_picks_first_and_last():
    from vqx.export.block_compare import spread

    assert spread(40, 4) == [0, 13, 26, 39] and spread(2, None) == [0, 1] and spread(5, 1) == [0]


def test_native_names_map_back():
    tr = build_tiny_pipeline("i2v").transformer
    assert all(diffusers_key(native_key(k)) == k for k in tr.state_dict())
    with pytest.raises(KeyError):
        diffusers_key("blocks.0.affine_norm1.weight")


# ---- what was evaluated is what is exported -----------------------------------------------------------

@pytest.mark.parametrize("fmt_name", ["w8a8", "fp8"])
def test_round_trip_is_bit_exact(models, tmp_path, fmt_name):
    model = models("t2v", fmt_name, True)
    out = tmp_path / "export"
    do_export(model, out, layout="blocks")
    t = tensors_of(out)
    _, _, targets, q, runtime = model
    assert len(q) == 20
    for target in targets:
        ql = q[target.name]
        p = target.native_name
        deq = t[f"{p}.weight"].float() * t[f"{p}.weight_scale"]
        assert t[f"{p}.weight"].dtype == CODE_DTYPE[fmt_name]
        assert torch.equal(deq, ql.dequantized_weight_fp32()), p
        assert torch.equal(deq.to(ql.weight.dtype), ql.weight), p
        assert torch.equal(t[f"{p}.bias"], ql.bias.to(torch.bfloat16))
        if ql.input_smooth_inv is not None:
            vec = "affine_norm1" if target.local_name.startswith("attn1") else "affine_norm3"
            assert torch.equal(t[f"blocks.{target.block}.{vec}.weight"], ql.input_smooth_inv)
            assert torch.equal(t[f"blocks.{target.block}.{vec}.bias"], ql.input_smooth_inv)
            torch.testing.assert_close(ql.input_smooth_inv, 1 / runtime[target.block][vec])


# ---- verify-export ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task,fmt_name,smooth,layout", [
    ("t2v", "w8a8", True, "single"), ("t2v", "w8a8", False, "blocks"),
    ("t2v", "fp8", True, "blocks"), ("t2v", "fp8", False, "single"), ("i2v", "fp8", True, "blocks"),
])
def test_verify_passes_on_fresh_exports(models, tmp_path, task, fmt_name, smooth, layout):
    model = models(task, fmt_name, smooth)
    out = tmp_path / "export"
    summary = do_export(model, out, layout=layout)
    # the exporter compared lightx2v's math on the files with the evaluated model's own blocks
    assert summary["verify"]["ok"] and summary["verify"]["blocks_compared"] == 2
    assert 0 < summary["verify"]["max_block_error"] < DEFAULT_TOLERANCE
    report = verify_export(out)  # without the model: rebuilt from config.json and the files
    assert report.ok, report.lines()
    assert len(report.block_errors) == 2 and max(report.block_errors.values()) < DEFAULT_TOLERANCE
    # every layout has the index lightx2v's mm_config versions (2025-06-16..2025-10-17) load a folder through
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: f.name for f in out.glob("*.safetensors") for k in load_file(f)}
    if layout == "single":
        assert set(index["weight_map"].values()) == {"diffusion_pytorch_model.safetensors"}
    if layout == "blocks":
        names = sorted(p.name for p in out.glob("*.safetensors"))
        assert names == ["block_0.safetensors", "block_1.safetensors", "non_block.safetensors"]
        index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
        t = {k: f.name for f in out.glob("*.safetensors") for k in load_file(f)}
        assert index["weight_map"] == t
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors_of(out).values())
        assert all(k.startswith("blocks.1.") for k, f in t.items() if f == "block_1.safetensors")


def _edit_tensor(folder, key, fn):
    for f in folder.glob("*.safetensors"):
        t = load_file(f)
        if key in t:
            new = fn(t[key])
            if new is None:
                del t[key]
            else:
                t[key] = new
            save_file(t, f)
            return
    raise KeyError(key)


def _drop_flag(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quant_method"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _flip_byte(folder):
    f = folder / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _truncate(folder):
    f = folder / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


CORRUPTIONS = {
    "missing scale": (lambda d: _edit_tensor(d, "blocks.1.self_attn.k.weight_scale", lambda t: None), True,
                      "missing: blocks.1.self_attn.k.weight_scale"),
    "wrong dtype": (lambda d: _edit_tensor(d, "blocks.0.ffn.2.weight_scale", lambda t: t.to(torch.bfloat16)), True,
                    "blocks.0.ffn.2.weight_scale: dtype torch.bfloat16, expected torch.float32"),
    "int32 codes": (lambda d: _edit_tensor(d, "blocks.0.ffn.0.weight", lambda t: t.to(torch.int32)), True,
                    "int8 or torch.float8_e4m3fn codes"),
    "missing flag": (_drop_flag, True, "lacks \"quant_method\": \"advanced_ptq\""),
    "zero scale": (lambda d: _edit_tensor(d, "blocks.0.cross_attn.o.weight_scale", lambda t: t * 0), True,
                   "blocks.0.cross_attn.o.weight_scale: 32 scale(s) <= 0"),
    "flipped byte": (_flip_byte, False, "sha256 differs"),
    "truncated file": (_truncate, False, "bytes, manifest says"),
    "extra file": (lambda d: save_file({"x": torch.zeros(1)}, d / "extra.safetensors"), False,
                   "extra.safetensors: not listed in manifest.json"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), False, "has no manifest.json"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_verify_catches_a_broken_export(t2v_int8_smooth, tmp_path, case):
    out = tmp_path / "export"
    do_export(t2v_int8_smooth, out)
    assert verify_export(out, compute=False).ok
    corrupt, rehashed, expected = CORRUPTIONS[case]
    corrupt(out)
    if rehashed:
        rehash(out)
    report = verify_export(out)
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems
    assert all("\n" not in p for p in report.problems)


def test_verify_catches_nan_fp8_codes(models, tmp_path):
    out = tmp_path / "export"
    do_export(models("t2v", "fp8", False), out)

    def nan_code(t):
        t = t.clone().view(torch.uint8)
        t[0, 0] = 0x7F  # e4m3fn NaN
        return t.view(torch.float8_e4m3fn)

    _edit_tensor(out, "blocks.0.self_attn.v.weight", nan_code)
    rehash(out)
    report = verify_export(out)
    assert any("blocks.0.self_attn.v.weight: 1 NaN code(s)" in p for p in report.problems), report.problems


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_verify_export_alone_catches_value_errors(models, tmp_path, case):
    """Each class of value corruption, in a folder whose manifest was re-hashed to match and no model in memory:
    verify-export fails on the block it hit, and only there (measured signals: bench/results/verify_floor.json)."""
    base = tmp_path / "export"
    do_export(models("t2v", "w8a8", True), base)
    clean = verify_export(base)
    assert clean.ok and max(clean.block_errors.values()) < DEFAULT_TOLERANCE / 5  # measured 2.2e-7 (tolerance 3e-6)
    changed = mutate(base, MUTATIONS[case], 0, 1)
    assert changed
    report = verify_export(base)
    assert not report.ok and all("\n" not in p for p in report.problems)
    hit = {int(p.split(".")[1].split(":")[0]) for p in report.problems}
    assert hit == ({0, 1} if case == "two blocks' codes swapped" else {0}), report.problems
    assert all(p.startswith("blocks.") for p in report.problems), report.problems


@pytest.mark.parametrize("linear", LINEARS)
def test_verify_export_catches_one_percent_scale_errors_and_zeroed_biases(models, tmp_path, linear):
    base = tmp_path / "export"
    do_export(models("i2v", "fp8", True), base)
    for fn in (scales_1pct, bias_zeroed):
        saved = {f: f.read_bytes() for f in base.rglob("*") if f.is_file()}
        mutate(base, fn, 1, 1, linear=linear)
        assert not verify_export(base).ok, (fn.__name__, linear)
        for f, data in saved.items():
            f.write_bytes(data)
        assert verify_export(base).ok


def test_verify_export_without_a_reference_says_what_it_could_not_check(t2v_int8_smooth, tmp_path):
    out = tmp_path / "export"
    do_export(t2v_int8_smooth, out)
    ref = out / REFERENCE_FILE
    ref.unlink()
    m = json.loads((out / "manifest.json").read_text())
    del m["files"][REFERENCE_FILE]
    (out / "manifest.json").write_text(json.dumps(m))
    report = verify_export(out)
    assert report.ok and not report.block_errors
    assert any("no reference/block_outputs.safetensors" in n and "was not compared" in n for n in report.notes)


def test_recorded_reference_is_the_evaluated_model(t2v_int8_smooth, tmp_path):
    """The recorded outputs are the evaluated blocks' own (fp32, weights as codes x scale), so an export and a
    model that no longer match (here: the model changed after the export) fail the comparison."""
    from vqx.export.lightx2v_reference import block_inputs, block_output, diffusers_rotary, fp32_block

    out = tmp_path / "export"
    do_export(t2v_int8_smooth, out)
    rec = load_file(out / REFERENCE_FILE)
    tr = t2v_int8_smooth[0].transformer
    inputs = block_inputs(32, False, 0)
    assert torch.equal(rec["inputs.x"], inputs["x"])
    from vqx.models.adapter import adapter_for

    ref = block_output(fp32_block(tr.blocks[1], adapter_for(tr)), inputs, diffusers_rotary(16, (1, 2, 2)))
    assert torch.equal(rec["blocks.1"], ref)
    assert rec["blocks.1.self_attn.q.act_codes"].dtype == torch.int8 and "blocks.1.self_attn.k.act_codes" not in rec  # shared input


# ---- atomic and honest --------------------------------------------------------------------------------

def test_failure_mid_write_leaves_nothing(t2v_int8_smooth, tmp_path, monkeypatch):
    calls = []
    real = lx._save

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path)

    monkeypatch.setattr(lx, "_save", failing)
    out = tmp_path / "export"
    with pytest.raises(OSError):
        do_export(t2v_int8_smooth, out, layout="blocks")
    assert not out.exists() and list(tmp_path.iterdir()) == []


KILLED_EXPORT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_export import quantized, do_export
    import vqx.export.lightx2v as lx
    from pathlib import Path
    real = lx._save
    def dying(tensors, path):
        real(tensors, path)
        os._exit(9)  # killed right after its first file
    lx._save = dying
    do_export(quantized("t2v", "w8a8", True), Path({out!r}), layout="blocks")
""")


def test_killed_export_leaves_nothing_that_verifies(t2v_int8_smooth, tmp_path):
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-c", KILLED_EXPORT.format(tests=str(ROOT / "tests"), out=str(out))],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 9, r.stderr
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].name.startswith(".export.partial.")
    assert (partial[0] / "block_0.safetensors").is_file()
    assert not verify_export(out).ok and not verify_export(partial[0]).ok
    assert any("no manifest.json" in p for p in verify_export(partial[0]).problems)
    do_export(t2v_int8_smooth, out)  # the next export beside it cleans the dead one's partial folder
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and verify_export(out).ok


@pytest.mark.parametrize("fmt_name", [f for f in FORMAT_RULES if lx.refusal(format_from_config(run_cfg("t2v", f, None).format))])
def test_unexportable_formats_are_refused_before_work(tmp_path, fmt_name):
    # w4a8 and the weight-only 8-bit / research formats have no lightx2v scheme
    assert fmt_name in ("none", "w8a16", "fp8_w", "fp_e3m4", "fp_e2m5", "w4a8")
    with pytest.raises(UserError) as e:
        lx.check(run_cfg("t2v", fmt_name, tmp_path / "export"))
    msg = str(e.value)
    assert f"format={fmt_name}" in msg and "w8a8, fp8" in msg and "\n" not in msg
    assert not (tmp_path / "export").exists()


def test_exportable_formats_pass_check_and_skips_are_refused(tmp_path):
    for fmt_name in ("w8a8", "fp8", "nvfp4", "mxfp8", "mxfp6", "mxfp4", "fp8_static", "fp8_b128", "w4a16_g128"):
        lx.check(run_cfg("t2v", fmt_name, tmp_path / "export"))
    cfg = run_cfg("t2v", "w8a8", tmp_path / "export")
    cfg.format.skip_patterns = ["*.ffn.net.2"]
    with pytest.raises(UserError, match="every block linear"):
        lx.check(cfg)


def test_existing_export_is_left_untouched(t2v_int8_smooth, tmp_path):
    out = tmp_path / "export"
    do_export(t2v_int8_smooth, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lx.check(run_cfg("t2v", "w8a8", out))  # the same run config (a rerun): its intact export is kept ...
    assert do_export(t2v_int8_smooth, out)["kept"]  # ... not rewritten
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(UserError) as e:  # another config: refused before any work ...
        lx.check(run_cfg("t2v", "w8a8", out, layout="blocks"))
    assert str(out) in str(e.value) and "export.overwrite=true" in str(e.value)
    with pytest.raises(UserError, match="export.overwrite=true"):  # ... and at export time
        do_export(t2v_int8_smooth, out, layout="blocks")
    (out / "config.json").write_text("{}")  # an export that no longer matches its manifest is never kept
    with pytest.raises(UserError, match="export.overwrite=true"):
        lx.check(run_cfg("t2v", "w8a8", out))
    (out / "config.json").write_bytes(before[Path("config.json")])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    do_export(t2v_int8_smooth, out, overwrite=True, dtype="float32")
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    not_ours = tmp_path / "data"
    not_ours.mkdir()
    (not_ours / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a vqx export"):
        lx.check(run_cfg("t2v", "w8a8", not_ours, overwrite=True))
    assert (not_ours / "keep.txt").read_text() == "x"


# ---- export=dequantized (formerly export=fake) ----------------------------------------------------------

def test_dequantized_export_loads_in_diffusers_with_the_evaluated_weights(models, tmp_path):
    from diffusers import WanTransformer3DModel

    model = models("t2v", "fp8", False)
    out = tmp_path / "export"
    summary = do_export(model, out, kind="dequantized")
    assert summary["kind"] == "dequantized"
    loaded = WanTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.bfloat16)
    for name, ql in model[3].items():
        lin = loaded.get_submodule(name)
        assert torch.equal(lin.weight, ql.weight) and torch.equal(lin.bias, ql.bias), name
    report = verify_export(out)
    assert report.ok, report.lines()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "kind": "fake"}))  # as exported before the rename
    report = verify_export(out)
    assert report.ok and report.kind == "fake", report.lines()
    (out / "transformer" / "config.json").write_text("{}")
    assert not verify_export(out).ok


def test_dequantized_export_refuses_runtime_smoothing(t2v_int8_smooth, tmp_path):
    with pytest.raises(UserError, match="export=dequantized cannot write this run: .*affine_norm1/affine_norm3"):
        do_export(t2v_int8_smooth, tmp_path / "export", kind="dequantized")
    assert list(tmp_path.iterdir()) == []


def test_unknown_manifest_kind_names_the_registered_verifiers(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "onnx", "files": {}}))
    report = verify_export(tmp_path)
    assert report.problems == ["manifest kind='onnx' is not valid; valid: dequantized, fake, lightx2v, torchao"]


# ---- end to end, as a user runs it --------------------------------------------------------------------

def verify_cli(*args):
    env = {**os.environ}
    env.pop("VQX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "vqx", "verify-export", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env)


@pytest.mark.parametrize("args,corrupt", [(["export=lightx2v", "format=fp8"], True),
                                          (["model=wan_tiny_i2v", "export=lightx2v", "export.layout=blocks"], False)])
def test_run_then_verify_export(vqx_run, tmp_path, args, corrupt):
    r = vqx_run([*args, "eval=none", "logger=none", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["export"]["dir"] == str(tmp_path / "export") and metrics["export"]["verify"]["ok"]
    v = verify_cli(tmp_path / "export")
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.startswith("OK ") and "max relative error" in v.stdout
    if corrupt:
        f = tmp_path / "export" / "diffusion_pytorch_model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x01
        f.write_bytes(bytes(data))
        v = verify_cli(tmp_path / "export")
        assert v.returncode == 1 and "sha256 differs" in v.stdout and "Traceback" not in v.stdout + v.stderr


def test_run_refuses_before_building_a_model(vqx_run, tmp_path):
    run_dir = tmp_path / "run"
    r = vqx_run(["export=lightx2v", "format=w8a16", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "format=w8a16" in lines[0] and "w8a8, fp8" in lines[0]
    assert not run_dir.exists()  # refused before the run started: no run dir at all
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "manifest.json").write_text("{}")
    r = vqx_run(["export=lightx2v", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2 and "export.overwrite=true" in r.stderr and str(run_dir / "export") in r.stderr
    assert "model wan_tiny" not in r.stdout + r.stderr  # refused before the model was built
