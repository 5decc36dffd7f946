"""The structure checks of a ``kind: lightx2v`` export (after `verify.verify_export` checked the manifest):
1. ``config.json``: Wan2.1 keys; the task (T2V/I2V) and block count come from it;
2. every expected tensor (name, dtype, shape) for that architecture, nothing else; codes int8 or
   float8_e4m3fn (one kind, the manifest's format), no NaN codes; scales fp32 [out, 1], positive, finite,
   bf16-representable; float tensors finite, fp32 where the evaluated model holds them in fp32, else in the
   manifest's dtype; smoothing vectors (fp32, weight == bias) exactly when ``quant_method: advanced_ptq`` is set;
   the shard index, when there is one, lists every tensor's file;
3. then, unless asked not to, lightx2v's math on the tensors against the evaluated model's recorded block
   outputs (`block_compare`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.adapter import LayerSelection, adapter_for, adapter_named
from ..quant.scheme import dequantize, nvfp4_global_scale
from ..runtime import torch_dtype
from . import contract
from .block_compare import compare_blocks
from .lightx2v_lowbit import LOWBIT_SCHEMES
from .lightx2v_lowbit_read import read_linear
from .lightx2v_reference import WEIGHTS_FILE, weight_digest
from .checks import MAX_LINES, ST_DTYPES, VERIFIERS, Report, TensorFiles, VerifyJob, names, read_json


@VERIFIERS.register("lightx2v")
@torch.no_grad()
def verify_lightx2v(job: VerifyJob, report: Report) -> None:
    folder = job.folder
    files = [n for n in job.files if "/" not in n]  # what lightx2v merges (the recorded reference is in a subfolder)
    wan_cfg = read_json(folder / "config.json", report)
    if wan_cfg is None:
        return
    cfg_problems = contract.check_wan_config(wan_cfg)
    report.problems += cfg_problems
    if cfg_problems:
        return
    if not files:
        report.problems.append("no .safetensors file in the folder")
        return
    tf = TensorFiles(folder, files, report)
    if (folder / "diffusion_pytorch_model.safetensors.index.json").is_file():
        _check_index(folder, tf, report)
    present = set(tf.where)
    smoothing = any(".affine_norm" in k for k in present)
    flag = wan_cfg.get("quant_method") == contract.ADVANCED_PTQ
    if smoothing and not flag:
        report.problems.append("the checkpoint holds affine_norm smoothing vectors but config.json lacks "
                               "\"quant_method\": \"advanced_ptq\": lightx2v would ignore them and run the smoothed "
                               "weights uncompensated (wrong videos, no error)")
    if flag and not smoothing:
        report.problems.append("config.json sets quant_method=advanced_ptq but the checkpoint holds no affine_norm "
                               "vectors: lightx2v would look them up and fail")
    dkw = _architecture(wan_cfg, tf)
    lowbit = job.manifest.get("scheme") if job.manifest.get("scheme") in LOWBIT_SCHEMES else None
    expected = contract.expected_tensors(dkw, smoothing, lowbit)
    missing, unexpected = set(expected) - present, present - set(expected)
    if missing:
        report.problems.append(f"{len(missing)} expected tensor(s) missing: {names(missing)}")
    if unexpected:
        report.problems.append(f"{len(unexpected)} unexpected tensor(s): {names(unexpected)}")
    report.info.update({"task": wan_cfg["model_type"], "blocks": wan_cfg["num_layers"],
                        "advanced_ptq": flag, "tensors": len(present)})

    scheme = _check_dtypes_shapes(tf, expected, present, job.manifest, report)
    if scheme is None:
        return
    report.info["scheme"] = scheme
    _check_values(tf, expected, present, scheme, report)
    if report.problems or not job.compute:
        return
    if lowbit:
        shapes = _linear_shapes(dkw)
        _check_lowbit_weights(folder, tf, shapes, lowbit, report)
        if not report.problems:
            compare_blocks(folder, tf, wan_cfg, dkw, lowbit, report, job.device, job.max_blocks,
                           lowbit=_unpacked_block(tf, shapes, lowbit))
    else:
        compare_blocks(folder, tf, wan_cfg, dkw, scheme, report, job.device, job.max_blocks)


def _linear_shapes(dkw: dict) -> dict[str, tuple[int, int]]:
    """Native name -> (out, in) of every block linear of the architecture."""
    model = contract.meta_transformer(dkw)
    return {t.native_name: tuple(t.module.weight.shape) for t in adapter_for(model).quant_targets(model, LayerSelection())}


def _unpacked_block(tf: TensorFiles, shapes: dict[str, tuple[int, int]], scheme: str):
    """Block index -> `block_compare.block_error`'s ``lowbit``: the block's linears unpacked and dequantized, the
    calibrated activation values as the layers use them (NVFP4: the global scale derived from input_absmax)."""
    act = LOWBIT_SCHEMES[scheme].activation
    ts = LOWBIT_SCHEMES[scheme].weight

    def block(i: int) -> dict:
        weights, values = {}, {}
        for prefix, (n, k) in shapes.items():
            if prefix.startswith(f"blocks.{i}."):
                got = read_linear(tf.get, prefix, scheme, n, k)
                local = prefix[len(f"blocks.{i}."):]
                weights[local] = dequantize(got["codes"], got["scale"], ts)
                value = got["input_scale"]
                values[local] = nvfp4_global_scale(value) if value is not None and act.global_scale else value
        return {"weights": weights, "values": values, "act": act}
    return block


def _check_lowbit_weights(folder: Path, tf: TensorFiles, shapes: dict[str, tuple[int, int]], scheme: str,
                          report: Report) -> None:
    """Every low-bit linear unpacked (`lightx2v_lowbit_read`, not the writer's code) and dequantized as vqx
    dequantizes: codes on the grid and finite scales give back, bit for bit, the weight the run evaluated (its
    recorded hash)."""
    digests = read_json(folder / WEIGHTS_FILE, report)
    if digests is None:
        return
    recorded, inputs = digests.get("sha256_fp32_weight") or {}, digests.get("input_value") or {}
    ts = LOWBIT_SCHEMES[scheme].weight
    bad = []
    for prefix, (n, k) in tqdm(sorted(shapes.items()), desc="unpack", unit="linear", leave=False, disable=len(shapes) < 100):
        got = read_linear(tf.get, prefix, scheme, n, k)
        if not (torch.isfinite(got["codes"]).all() and torch.isfinite(got["scale"]).all()):
            bad.append(f"{prefix}: non-finite codes or scales after unpacking")
        elif weight_digest(dequantize(got["codes"], got["scale"], ts)) != recorded.get(prefix):
            bad.append(f"{prefix}: the unpacked weight is not the evaluated one"
                       + ("" if prefix in recorded else f" ({WEIGHTS_FILE} has no entry)"))
        elif got["input_scale"] is not None and float(got["input_scale"]) != inputs.get(prefix):
            bad.append(f"{prefix}: calibrated activation value {float(got['input_scale'])!r}, the evaluated layer "
                       f"used {inputs.get(prefix)!r}")
    report.problems += bad[:MAX_LINES] + ([f"... and {len(bad) - MAX_LINES} more"] if len(bad) > MAX_LINES else [])
    report.info["linears_unpacked"] = len(shapes)
    report.notes.append(f"{scheme}: every linear unpacked and checked against the evaluated weight bit for bit; "
                        f"its matmul emulated in fp32 on the dequantized operands (lightx2v's kernels accumulate in "
                        f"their own order and precision)")


def _architecture(wan_cfg: dict, tf: TensorFiles) -> dict:
    """diffusers arguments; text/image widths and the patch are read off the tensors (fixed in Wan2.1)."""
    kw = {}
    if "text_embedding.0.weight" in tf.where:
        kw["text_dim"] = tf.meta("text_embedding.0.weight")[1][1]
    if "img_emb.proj.0.weight" in tf.where:
        kw["image_dim"] = tf.meta("img_emb.proj.0.weight")[1][0]
    if "patch_embedding.weight" in tf.where and len(tf.meta("patch_embedding.weight")[1]) == 5:
        kw["patch_size"] = tf.meta("patch_embedding.weight")[1][2:]
    return contract.diffusers_config(wan_cfg, **kw)


def _check_index(folder: Path, tf: TensorFiles, report: Report) -> None:
    index = read_json(folder / "diffusion_pytorch_model.safetensors.index.json", report)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        report.problems.append("diffusion_pytorch_model.safetensors.index.json has no weight_map")
        return
    wrong = [k for k, f in index["weight_map"].items() if tf.where.get(k) != f]
    unlisted = set(tf.where) - set(index["weight_map"])
    if wrong:
        report.problems.append(f"index.json maps {len(wrong)} tensor(s) to the wrong file: {names(wrong)}")
    if unlisted:
        report.problems.append(f"index.json does not list {len(unlisted)} tensor(s) (older lightx2v reads only "
                               f"listed ones): {names(unlisted)}")


def _check_dtypes_shapes(tf: TensorFiles, expected: dict, present: set, manifest: dict, report: Report) -> str | None:
    """Dtype and shape of every expected tensor present; returns the code scheme ("int8"/"fp8") or None."""
    float_dtype = contract.EXPORT_DTYPES.get(manifest.get("dtype"))
    if float_dtype is None:
        report.problems.append(f"manifest dtype={manifest.get('dtype')!r} is not valid; valid: {', '.join(contract.EXPORT_DTYPES)}")
    model_dtype = torch_dtype(((manifest.get("run_config") or {}).get("model") or {}).get("dtype"), default=torch.bfloat16)
    to_diffusers = adapter_named("wan").diffusers_key
    code_dtypes = {}
    for key in sorted(present & set(expected)):
        st_dtype, shape = tf.meta(key)
        dtype = ST_DTYPES.get(st_dtype)
        exp = expected[key]
        if shape != exp.shape:
            report.problems.append(f"{key}: shape {list(shape)}, expected {list(exp.shape)}")
        if exp.kind == "codes":
            code_dtypes.setdefault(dtype, key)
            continue
        if exp.kind == "lowbit":
            if dtype != exp.dtype:
                report.problems.append(f"{key}: dtype {dtype or st_dtype}, expected {exp.dtype} (lightx2v's "
                                       f"{manifest.get('scheme')} loader)")
            continue
        want = {"scale": torch.float32, "smooth": torch.float32, "float": float_dtype}[exp.kind]
        kept = exp.kind == "float" and contract.held_in_fp32(to_diffusers(key), model_dtype)
        if kept:
            want = torch.float32
        if want is not None and dtype != want:
            why = {"scale": " (lightx2v reads scales as fp32)",
                   "float": " (the evaluated model holds it in fp32)" if kept else ""}.get(exp.kind, "")
            report.problems.append(f"{key}: dtype {dtype or st_dtype}, expected {want}{why}")
    if any(e.kind == "lowbit" for e in expected.values()):
        return manifest.get("scheme")
    schemes = {contract.scheme_of_dtype(d) for d in code_dtypes}
    if None in schemes:
        bad = [f"{k} ({d})" for d, k in code_dtypes.items() if contract.scheme_of_dtype(d) is None]
        report.problems.append(f"quantized weights must be torch.int8 or torch.float8_e4m3fn codes: {names(bad)}")
        return None
    if len(schemes) > 1:
        report.problems.append(f"quantized weights mix dtypes {sorted(map(str, code_dtypes))}; lightx2v runs one scheme")
        return None
    if not schemes:
        return None
    scheme = schemes.pop()
    if manifest.get("scheme") != scheme:
        report.problems.append(f"codes are {contract.CODE_DTYPES[scheme]} but the manifest's scheme is "
                               f"{manifest.get('scheme')!r} (format {manifest.get('format')!r})")
    return scheme


def _check_values(tf: TensorFiles, expected: dict, present: set, scheme: str, report: Report) -> None:
    bad_lines = 0
    for key in tqdm(sorted(present & set(expected)), desc="check", unit="tensor", leave=False, disable=len(present) < 500):
        if bad_lines > MAX_LINES:
            break
        kind = expected[key].kind
        try:
            t = tf.get(key)
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"{key}: cannot be read ({str(e).splitlines()[0][:160]})")
            bad_lines += 1
            continue
        problem = None
        if kind == "lowbit":
            continue  # unpacked and checked as a whole linear (_check_lowbit_weights)
        if kind == "codes":
            if t.dtype == torch.float8_e4m3fn and torch.isnan(t.float()).any():
                problem = f"{int(torch.isnan(t.float()).sum())} NaN code(s)"
        elif kind == "scale":
            s = t.float()
            if not torch.isfinite(s).all():
                problem = "non-finite scale(s)"
            elif (s <= 0).any():
                problem = f"{int((s <= 0).sum())} scale(s) <= 0"
            elif not torch.equal(s.to(torch.bfloat16).float(), s):
                problem = "scales are not bf16-representable (lightx2v's loader would round them)"
        elif t.is_floating_point() and not torch.isfinite(t.float()).all():
            problem = "non-finite values"
        elif kind == "smooth":
            if (t <= 0).any():
                problem = f"{int((t <= 0).sum())} smoothing factor(s) <= 0"
            elif key.endswith(".weight") and key[:-7] + ".bias" in present and not torch.equal(t, tf.get(key[:-7] + ".bias")):
                problem = "weight and bias differ; a smoothing vector needs both = 1/s"
        if problem:
            report.problems.append(f"{key}: {problem}")
            bad_lines += 1
    smooth = [k for k in present if expected.get(k) and expected[k].kind == "smooth" and k.endswith(".weight")]
    if smooth and not report.problems:
        unrounded = [k for k in smooth if not torch.equal(tf.get(k).to(torch.bfloat16).float(), tf.get(k).float())]
        if unrounded:
            report.notes.append(f"{len(unrounded)} smoothing vector(s) are not bf16-representable; lightx2v's bf16 "
                                f"mode rounds them, a small difference from the fake-quant model that the fp32 "
                                f"check does not include")
