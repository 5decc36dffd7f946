"""lightx2v's low-bit checkpoint tensors, read back by a reader written from lightx2v's kernels (not from the writer):
the scale offsets of ``get_sf_out_address``, the nibble order of ``cvt.rn.satfinite.e2m1x2``, the MXFP6 byte layout
of ``mxfp6_quant_kernels_sm120.cu``, and the E2M1 / E3M2 / e8m0 encodings by their definitions."""

import pytest
import torch
from torch import nn

from vqx.export.schemas import DEFAULT_TOLERANCE
from vqx.export.lightx2v_lowbit import LOWBIT_SCHEMES, linear_tensors, lowbit_scheme
from vqx.quant.formats import SCHEMES
from vqx.quant.linear import QuantLinear

N, K = 200, 96  # 200 rows: two 128-row scale tiles, the second padded; K/32 = 3 scale columns, padded to 4


# ---- the independent reader ---------------------------------------------------------------------------

def sf_offset(m: int, k: int, scale_cols: int) -> int:
    """lightx2v's get_sf_out_address: [m tiles, k tiles, 32 (m % 32), 4 (m % 128 // 32), 4 (k % 4)]."""
    k_tiles = (scale_cols + 3) // 4
    return (m // 128) * (k_tiles * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)


def read_scales(stored: torch.Tensor, rows: int, cols: int) -> list[list[int]]:
    flat = stored.view(torch.uint8).flatten().tolist()
    return [[flat[sf_offset(m, k, cols)] for k in range(cols)] for m in range(rows)]


def decode_e2m1(nibble: int) -> float:
    mag = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0][nibble & 7]
    return -mag if nibble & 8 else mag


def decode_e3m2(bits: int) -> float:
    sign, exp, man = bits >> 5, (bits >> 2) & 7, bits & 3
    mag = man / 4 * 2.0 ** -2 if exp == 0 else (1 + man / 4) * 2.0 ** (exp - 3)
    return -mag if sign else mag


def read_fp4(weight: torch.Tensor) -> list[list[float]]:
    out = []
    for row in weight.tolist():
        vals = []
        for byte in row:
            vals += [decode_e2m1(byte & 0xF), decode_e2m1(byte >> 4)]  # element 2i low, 2i+1 high
        out.append(vals)
    return out


def read_fp6(weight: torch.Tensor) -> list[list[float]]:
    out = []
    for row in weight.tolist():
        vals = []
        for i in range(0, len(row), 3):
            p0, p1, p2 = row[i:i + 3]
            a, b = p0 & 63, (p0 >> 6) | ((p1 & 15) << 2)
            c, d = (p1 >> 4) | ((p2 & 3) << 4), p2 >> 2
            vals += [decode_e3m2(v) for v in (a, b, c, d)]
        out.append(vals)
    return out


def _linear(name: str, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * torch.logspace(-2, 1, K))
        lin.weight[3] = 0.0  # all-zero groups
        lin.weight[4, :16] = -1e-6  # tiny negatives: negative-zero codes
    scheme = SCHEMES[name]
    calibrated = scheme.activation is not None and scheme.activation.calibrated
    value = torch.tensor(5.0 if name == "nvfp4" else 0.01).bfloat16().float()  # as calibration gives them
    return QuantLinear(lin, scheme, input_scale=value if calibrated else None)


def _codes(q):
    return q.weight_codes.float().tolist()


# ---- round trips ----------------------------------------------------------------------------------------

def test_nvfp4_tensors_read_back_to_the_codes_and_scales():
    q = _linear("nvfp4")
    t = linear_tensors(q, "blocks.0.self_attn.q")
    assert sorted(t) == ["blocks.0.self_attn.q." + k for k in
                         ("bias", "input_absmax", "weight", "weight_global_scale", "weight_scale")]
    w, s = t["blocks.0.self_attn.q.weight"], t["blocks.0.self_attn.q.weight_scale"]
    assert w.dtype == torch.uint8 and w.shape == (N, K // 2)
    assert s.dtype == torch.float8_e4m3fn and s.shape == (256, 8)  # K/16 = 6 scale columns, padded to 8
    assert read_fp4(w) == _codes(q)
    g = t["blocks.0.self_attn.q.weight_global_scale"]
    assert g.shape == () and float(g) == float(q.weight_global_scale)
    e4m3 = torch.tensor(read_scales(s, N, K // 16), dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(e4m3 / g, q.weight_scale)
    padded = s.view(torch.uint8).flatten().tolist()
    used = {sf_offset(m, k, K // 16) for m in range(N) for k in range(K // 16)}
    assert all(v == 0 for i, v in enumerate(padded) if i not in used)  # the padding is zeros
    assert float(t["blocks.0.self_attn.q.input_absmax"]) == 5.0
    # -1e-6 under a global scale for |w| ~ 10: its e4m3 group scale underflows to 0 and the codes are -0, which keep
    # the sign bit (0x88: two negative-zero nibbles) as the kernel's cvt does; the all-zero row packs to 0x00
    assert float(q.weight_scale[4, 0]) == 0 and w[4, :8].tolist() == [0x88] * 8 and w[3].eq(0).all()


@pytest.mark.parametrize("name,reader,width", [("mxfp4", read_fp4, K // 2), ("mxfp6", read_fp6, 3 * K // 4)])
def test_mx_packed_tensors_read_back(name, reader, width):
    q = _linear(name)
    t = linear_tensors(q, "p")
    w, s = t["p.weight"], t["p.weight_scale"]
    assert w.dtype == torch.uint8 and w.shape == (N, width)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (256, 4)
    assert reader(w) == _codes(q)
    exps = torch.tensor(read_scales(s, N, K // 32), dtype=torch.float64)
    assert torch.equal(torch.exp2(exps - 127).float(), q.weight_scale)
    assert float(q.weight_scale[3, 0]) == 2.0 ** -127  # an all-zero group: e8m0 code 0


def test_mxfp8_weight_is_e4m3_bits():
    q = _linear("mxfp8")
    t = linear_tensors(q, "p")
    assert t["p.weight"].dtype == torch.uint8 and t["p.weight"].shape == (N, K)
    assert t["p.weight"].view(torch.float8_e4m3fn).float().tolist() == _codes(q)
    exps = torch.tensor(read_scales(t["p.weight_scale"], N, K // 32), dtype=torch.float64)
    assert torch.equal(torch.exp2(exps - 127).float(), q.weight_scale)


def test_fp8_per_tensor_and_b128_tensors():
    q = _linear("fp8_static")
    t = linear_tensors(q, "p")
    assert t["p.weight"].dtype == torch.float8_e4m3fn and t["p.weight"].float().tolist() == _codes(q)
    assert t["p.weight_scale"].shape == () and t["p.input_scale"].shape == (1,)
    assert float(t["p.input_scale"]) == float(torch.tensor(0.01).bfloat16())
    q.input_scale.fill_(0.01)  # not bf16-representable: the loader would read another scale
    with pytest.raises(ValueError, match="p.input_scale is not bf16-representable"):
        linear_tensors(q, "p")
    lin = nn.Linear(256, 384)
    q = QuantLinear(lin, SCHEMES["fp8_b128"])
    t = linear_tensors(q, "p")
    assert t["p.weight_scale"].shape == (3, 2) and t["p.weight_scale"].dtype == torch.float32
    assert torch.equal(t["p.weight"].float(), q.weight_codes.float())


def test_the_reader_sees_swapped_nibbles_and_an_unswizzled_scale():
    q = _linear("mxfp4")
    t = linear_tensors(q, "p")
    w = t["p.weight"]
    swapped = (w >> 4) | ((w & 0xF) << 4)
    assert read_fp4(swapped) != _codes(q)
    s = t["p.weight_scale"].view(torch.uint8)
    plain = torch.zeros_like(s)
    plain[:N, :K // 32] = s.flatten()[[sf_offset(m, k, K // 32) for m in range(N) for k in range(K // 32)]].reshape(N, -1)
    assert read_scales(plain, N, K // 32) != read_scales(s, N, K // 32)  # row-major scales are not the layout


def test_marlin_tensors_are_marlins_own_packing():
    """int4-g128-marlin: the writer's B and s equal IST-DASLab/marlin's Layer.pack on the fake-quantized fp16 weight
    (grouped, and one group per row at K = 128), byte for byte; the reader gives the codes and scales back."""
    from lowbit_reference import marlin_layer_pack

    from vqx.export.lightx2v_lowbit_read import marlin_codes, marlin_scales

    for n, k in ((256, 384), (512, 128)):
        q = _marlin_linear(n, k)
        t = linear_tensors(q, "p")
        b, s = marlin_layer_pack(q.dequantized_weight_fp32().half(), q.weight_scale, min(128, k))
        assert torch.equal(t["p.weight"], b) and torch.equal(t["p.weight_scale"], s)
        assert torch.equal(t["p.weight_workspace"], torch.zeros(n // 128 * 16, dtype=torch.int32))
        assert torch.equal(marlin_codes(t["p.weight"], n, k), q.weight_codes.float())
        assert torch.equal(marlin_scales(t["p.weight_scale"], n), q.weight_scale)
    swapped = t["p.weight"].clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # two words of a tile row swapped: other codes
    assert not torch.equal(marlin_codes(swapped, n, k), q.weight_codes.float())


def test_marlin_refuses_shapes_its_kernel_cannot_run():
    with pytest.raises(ValueError, match=r"^p: Marlin's int4 GEMM needs in_features divisible by 128 and "
                                         r"out_features by 256, not \[200, 96\]$"):
        linear_tensors(_linear("w4a16_g128"), "p")


def _marlin_linear(n: int, k: int) -> QuantLinear:
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.logspace(-2, 1, k))
        lin.weight[5] = 0.0
    return QuantLinear(lin, SCHEMES["w4a16_g128"])


def test_schemes_without_a_lightx2v_low_bit_layout_are_refused():
    for name in ("w4a8", "w8a8"):
        q = _linear(name)
        with pytest.raises(ValueError, match=f"p: scheme {name} has no lightx2v low-bit scheme; valid: nvfp4, mxfp8"):
            linear_tensors(q, "p")
    assert {lowbit_scheme(SCHEMES[s.name]) for s in LOWBIT_SCHEMES.values()} == set(LOWBIT_SCHEMES)


def test_export_lightx2v_refuses_w4a8_in_one_line(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process(["format=w4a8", "export=lightx2v", "eval=none", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("vqx: error: export=lightx2v cannot write format=w4a8: lightx2v has no scheme for w4a8")
    assert not (tmp_path / "run" / "export").exists()


# ---- vqx's own reader (verify-export, vqx.load): tensors -> the evaluated weights ----------------------------

@pytest.mark.parametrize("name", sorted(LOWBIT_SCHEMES))
def test_vqx_reader_gives_back_the_evaluated_weight_bit_for_bit(name):
    from vqx.export.lightx2v_lowbit_read import expected_linear, read_linear
    from vqx.quant.scheme import dequantize

    vqx_name = LOWBIT_SCHEMES[name].name
    q = {"fp8-b128-deepgemm": _linear_b128, "int4-g128-marlin": lambda: _marlin_linear(256, 256)}.get(
        name, lambda: _linear(vqx_name))()
    n, k = q.out_features, q.in_features
    tensors = linear_tensors(q, "p")
    want = expected_linear(name, n, k)
    assert {f"p.{s}" for s in want} | {"p.bias"} == set(tensors)
    for suffix, (dtype, shape) in want.items():
        assert (tensors[f"p.{suffix}"].dtype, tuple(tensors[f"p.{suffix}"].shape)) == (dtype, shape), suffix
    got = read_linear(tensors.__getitem__, "p", name, n, k)
    assert torch.equal(dequantize(got["codes"], got["scale"], q.scheme.weight), q.dequantized_weight_fp32())
    calibrated = q.input_absmax if name == "nvfp4" else q.input_scale
    assert (got["input_scale"] is None) == (calibrated is None)
    if calibrated is not None:
        assert torch.equal(got["input_scale"].reshape(()), calibrated.float().reshape(()))


def _linear_b128() -> QuantLinear:
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(256, 384)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 256, generator=g) * torch.logspace(-2, 1, 256))
    return QuantLinear(lin, SCHEMES["fp8_b128"])


# ---- export=lightx2v end to end, and verify-export catching broken folders ----------------------------------

EXPORTED = ["nvfp4", "mxfp8", "mxfp6", "mxfp4", "fp8_static", "fp8_b128"]


@pytest.fixture(scope="module")
def lowbit_exports(tmp_path_factory):
    import vqx

    root = tmp_path_factory.mktemp("lowbit_exports")
    out = {}
    for fmt in EXPORTED:
        exp = vqx.Experiment(model="wan_tiny", format=fmt, algorithm="rtn", eval="none", run_dir=root / fmt,
                             cache_dir=str(root / "cache"), calib={"num_prompts": 1, "steps": 2})
        out[fmt] = exp.export(exp.quantize(exp.load()), root / fmt / "export")
    return out


@pytest.mark.parametrize("fmt", EXPORTED)
def test_every_lowbit_format_exports_for_lightx2v_and_verifies(lowbit_exports, fmt):
    import json
    from pathlib import Path

    from vqx.export.verify import verify_export

    summary = lowbit_exports[fmt]
    scheme = lowbit_scheme(SCHEMES[fmt])
    assert summary["scheme"] == scheme and summary["verify"]["ok"], summary["verify"]
    folder = Path(summary["dir"])
    assert json.loads((folder / "lightx2v_config.json").read_text())["dit_quant_scheme"] == scheme
    report = verify_export(folder)  # on its own, later: the unpacked weights against the recorded evaluated ones
    assert report.ok and report.info["linears_unpacked"] == 20, report.problems
    # and every block computed from the unpacked tensors in lockstep with the recorded activation codes
    assert sorted(report.block_errors) == [0, 1] and max(report.block_errors.values()) <= DEFAULT_TOLERANCE


def _edit(folder, fn):
    from safetensors.torch import load_file, save_file

    from vqx.export.mutations import rehash

    path = folder / "diffusion_pytorch_model.safetensors"
    t = load_file(path)
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})
    rehash(folder)


def _swap_nibbles(t):
    w = t["blocks.0.self_attn.q.weight"]
    t["blocks.0.self_attn.q.weight"] = (w >> 4) | ((w & 0xF) << 4)


def _unswizzle_scale(t):
    from vqx.export.lightx2v_lowbit_read import unswizzle

    s = t["blocks.1.ffn.0.weight_scale"]
    rows, cols = s.shape
    plain = torch.zeros(rows, cols, dtype=torch.uint8)
    plain[:, :] = unswizzle(s.view(torch.uint8), rows, cols)  # row-major: what a writer that forgot the swizzle stores
    t["blocks.1.ffn.0.weight_scale"] = plain.view(s.dtype)


def _global_scale_1pct(t):
    t["blocks.0.cross_attn.o.weight_global_scale"] = t["blocks.0.cross_attn.o.weight_global_scale"] * 1.01


@pytest.mark.parametrize("fmt,edit,message", [
    ("nvfp4", _swap_nibbles, "blocks.0.self_attn.q: the unpacked weight is not the evaluated one"),
    ("mxfp4", _swap_nibbles, "blocks.0.self_attn.q: the unpacked weight is not the evaluated one"),
    ("nvfp4", _unswizzle_scale, "blocks.1.ffn.0: the unpacked weight is not the evaluated one"),
    ("mxfp6", _unswizzle_scale, "blocks.1.ffn.0: the unpacked weight is not the evaluated one"),
    ("nvfp4", lambda t: t.pop("blocks.0.self_attn.k.input_absmax"),
     "1 expected tensor(s) missing: blocks.0.self_attn.k.input_absmax"),
    ("nvfp4", _global_scale_1pct, "blocks.0.cross_attn.o: the unpacked weight is not the evaluated one"),
    ("fp8_static", lambda t: t.pop("blocks.1.self_attn.v.input_scale"),
     "1 expected tensor(s) missing: blocks.1.self_attn.v.input_scale"),
    ("nvfp4", lambda t: t.update({"blocks.1.ffn.2.input_absmax": t["blocks.1.ffn.2.input_absmax"] * 2}),
     "blocks.1.ffn.2: calibrated activation value"),
    ("fp8_static", lambda t: t.update({"blocks.0.cross_attn.q.input_scale": t["blocks.0.cross_attn.q.input_scale"] * 2}),
     "blocks.0.cross_attn.q: calibrated activation value"),
    # input-side float tensors: seen by the lockstep (codes / scales) or in the block output
    ("nvfp4", lambda t: t.update({"blocks.1.norm3.weight": t["blocks.1.norm3.weight"] * 1.01}),
     "blocks.1: the inputs of cross_attn.q quantize to other codes than the evaluated model's"),
    ("mxfp8", lambda t: t.update({"blocks.0.self_attn.o.bias": t["blocks.0.self_attn.o.bias"] * 1.01}),
     "blocks.0: lightx2v's math on the exported tensors differs from the evaluated block's recorded output"),
    ("fp8_b128", lambda t: t.update({"blocks.1.modulation": t["blocks.1.modulation"] * 1.001}),
     "blocks.1: the activation scales of ffn.0, self_attn.k, self_attn.q, self_attn.v differ from the evaluated "
     "model's away from any rounding boundary"),
])
def test_verify_export_catches_broken_lowbit_folders(lowbit_exports, tmp_path, fmt, edit, message):
    import shutil
    from pathlib import Path

    from vqx.export.verify import verify_export

    folder = tmp_path / "export"
    shutil.copytree(Path(lowbit_exports[fmt]["dir"]), folder)
    _edit(folder, edit)
    report = verify_export(folder)
    assert not report.ok and any(message in p for p in report.problems), report.problems


def test_w4a16_g128_exports_as_marlin_and_verifies(tmp_path):
    """wan_mini (256 / 1024 wide, shapes Marlin runs) end to end: the int4-g128-marlin folder verifies, names the GPUs,
    loads back bit for bit; two swapped Marlin words are caught."""
    import shutil

    import vqx
    from vqx.export.verify import verify_export

    exp = vqx.Experiment(model="wan_mini", format="w4a16_g128", algorithm="rtn", eval="none", run_dir=tmp_path / "run")
    state = exp.quantize(exp.load())
    summary = exp.export(state, tmp_path / "export")
    assert summary["scheme"] == "int4-g128-marlin" and summary["verify"]["ok"], summary["verify"]
    folder = tmp_path / "export"
    assert "Marlin's int4 x fp16 GEMM" in (folder / "LIGHTX2V.md").read_text()
    report = verify_export(folder)
    assert report.ok and report.info["linears_unpacked"] == 40, report.problems
    pipe = exp.load()
    vqx.load(folder, pipe)
    for name, q in state.quantized.items():
        assert torch.equal(pipe.transformer.get_submodule(name).weight, q.weight), name
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)

    def swap_words(t):
        w = t["blocks.2.ffn.2.weight"]
        w[:, [0, 1]] = w[:, [1, 0]]

    _edit(broken, swap_words)
    report = verify_export(broken)
    assert not report.ok and any("blocks.2.ffn.2: the unpacked weight is not the evaluated one" in p for p in report.problems)


def test_marlin_export_refuses_a_model_it_cannot_hold_before_calibration(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process(["model=wan_tiny", "format=w4a16_g128", "algorithm=gptq", "export=lightx2v", "eval=none",
                            "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "vqx: error: export=lightx2v cannot write format=w4a16_g128 for this model: blocks.0.attn1.to_q: Marlin's int4 "
        "GEMM needs in_features divisible by 128 and out_features by 256, not [32, 32] (every Wan2.1 size fits; use "
        "export=dequantized or export=none)")
    assert "stage calibrate" not in (tmp_path / "run" / "run.log").read_text()
