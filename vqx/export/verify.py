"""Check an export folder: integrity, the lightx2v contract, and lightx2v's math against vqx's fake quant.

For ``kind: lightx2v`` exports:
1. ``manifest.json``: every file present with its hash and size, no unlisted file;
2. ``config.json``: Wan2.1 keys; the task (T2V/I2V) and block count come from it;
3. every expected tensor (name, dtype, shape) for that architecture, nothing else; codes int8 or
   float8_e4m3fn (one kind, the manifest's format), no NaN codes; scales fp32 [out, 1], positive, finite,
   bf16-representable; float tensors finite; smoothing vectors (fp32, weight == bias) exactly when
   ``quant_method: advanced_ptq`` is set;
4. for random block inputs, each block computed (a) the way lightx2v computes it from the files
   (`lightx2v_math`) and (b) by the fake-quant diffusers block: the evaluated model's own block when the
   exporter calls this, else a diffusers block rebuilt from config.json with the exported float tensors and
   QuantLinears made from the exported codes and scales. The error is relative to the block's update
   (output - input, which is what quantization changes), and must stay within the tolerance.
``kind: fake`` exports get steps 1 and a key/shape check against diffusers' model for their config.
Every failure is one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models.adapter import adapter_for, set_submodule
from ..quant.formats import FORMATS, get_format
from ..quant.linear import QuantLinear
from . import contract, lightx2v_math
from .manifest import check_files, read_manifest

# Max relative error of a block's update between lightx2v's GEMMs and the fake-quant block. The two differ
# by rounding order only (one bf16 rounding of an fp32-accumulated GEMM vs bf16 dequantized operands), but a
# tiny difference in front of the next per-token quantizer flips some codes, so a correct export measures
# 0.015-0.04 (tiny and 1.3B-wide blocks, int8 and fp8). Export bugs measure 0.17 (one bias dropped) to 0.9+
# (smoothing vectors missing or inverted, q/k swapped).
DEFAULT_TOLERANCE = 0.1
GRID = (2, 4, 6)  # latent frames, height, width after patching: 48 tokens
TEXT_TOKENS_T2V = 64  # T2V cross-attention accepts any context length; I2V needs Wan's 512
IMAGE_TOKENS = 32  # > 16: torch._int_mm on CUDA needs more than 16 rows
MAX_LINES = 25


@dataclass
class Report:
    folder: Path
    tolerance: float
    kind: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    block_errors: dict[int, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        errs = list(self.block_errors.values())
        return {"ok": self.ok, "problems": self.problems[:MAX_LINES], "notes": self.notes,
                "blocks_compared": len(errs), "max_block_error": max(errs) if errs else None,
                "mean_block_error": sum(errs) / len(errs) if errs else None, "tolerance": self.tolerance}

    def lines(self) -> list[str]:
        desc = ", ".join(f"{k}={v}" for k, v in self.info.items())
        head = f"{'OK' if self.ok else 'FAILED'} {self.folder} ({self.kind or 'unknown kind'}{', ' + desc if desc else ''})"
        out = [head]
        if self.block_errors:
            i, worst = max(self.block_errors.items(), key=lambda kv: kv[1])
            out.append(f"  block outputs, lightx2v math vs fake quant: max relative error {worst:.3g} (blocks.{i}), "
                       f"mean {sum(self.block_errors.values()) / len(self.block_errors):.3g}, tolerance {self.tolerance:g}")
        out += [f"  note: {n}" for n in self.notes]
        shown = self.problems[:MAX_LINES]
        out += [f"  error: {p}" for p in shown]
        if len(self.problems) > len(shown):
            out.append(f"  error: ... and {len(self.problems) - len(shown)} more")
        return out


def _names(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _read_json(path: Path, report: Report) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        report.problems.append(f"{path.name} is missing")
    except (ValueError, UnicodeDecodeError) as e:
        report.problems.append(f"{path.name} is not valid JSON ({e})")
    return None


class TensorFiles:
    """Lazy access to every tensor of a folder's safetensors files (each read only when asked for)."""

    def __init__(self, folder: Path, files: list[str], report: Report):
        from safetensors import safe_open

        self.handles, self.where = {}, {}
        for name in files:
            try:
                h = safe_open(str(folder / name), framework="pt")
                keys = list(h.keys())
            except Exception as e:  # noqa: BLE001  (any corrupt header: one line)
                report.problems.append(f"{name}: unreadable safetensors file ({str(e).splitlines()[0][:160]})")
                continue
            self.handles[name] = h
            for k in keys:
                if k in self.where:
                    report.problems.append(f"{k}: in both {self.where[k]} and {name}")
                self.where[k] = name

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)

    def meta(self, key: str) -> tuple[str, tuple[int, ...]]:
        s = self.handles[self.where[key]].get_slice(key)
        return s.get_dtype(), tuple(s.get_shape())


def verify_export(folder: str | Path, *, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0,
                  reference: torch.nn.Module | None = None, compute: bool = True, device: str | None = None,
                  max_blocks: int | None = None) -> Report:
    """Check an export folder. ``reference``: the fake-quant transformer to compare with (else one rebuilt
    from the folder); ``device``: where lightx2v's GEMMs run (default: the reference's, else cuda if
    available); ``max_blocks``: compare that many evenly spread blocks (default all; every tensor of every
    block is checked regardless)."""
    folder = Path(folder)
    report = Report(folder, tolerance)
    manifest, problems = read_manifest(folder)
    report.problems += problems
    if manifest is None:
        return report
    report.kind = manifest.get("kind")
    report.problems += check_files(folder, manifest)
    safetensors_files = sorted(n for n in manifest["files"] if n.endswith(".safetensors") and (folder / n).is_file())
    if report.kind == "fake":
        _verify_fake(folder, safetensors_files, report)
    elif report.kind == "lightx2v":
        with torch.no_grad():
            _verify_lightx2v(folder, manifest, safetensors_files, report, seed, reference, compute, device, max_blocks)
    else:
        report.problems.append(f"manifest kind={report.kind!r} is not valid; valid: lightx2v, fake")
    return report


# ---- lightx2v ------------------------------------------------------------------------------------------

def _verify_lightx2v(folder: Path, manifest: dict, files: list[str], report: Report, seed: int,
                     reference: torch.nn.Module | None, compute: bool, device: str | None,
                     max_blocks: int | None) -> None:
    wan_cfg = _read_json(folder / "config.json", report)
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
    expected = contract.expected_tensors(dkw, smoothing)
    missing, unexpected = set(expected) - present, present - set(expected)
    if missing:
        report.problems.append(f"{len(missing)} expected tensor(s) missing: {_names(missing)}")
    if unexpected:
        report.problems.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
    report.info.update({"task": wan_cfg["model_type"], "blocks": wan_cfg["num_layers"],
                        "advanced_ptq": flag, "tensors": len(present)})

    scheme = _check_dtypes_shapes(tf, expected, present, manifest, report)
    if scheme is None:
        return
    report.info["scheme"] = scheme
    _check_values(tf, expected, present, scheme, report)
    if report.problems or not compute:
        return
    _compare_blocks(tf, wan_cfg, dkw, scheme, manifest, report, seed, reference, device, max_blocks)


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
    index = _read_json(folder / "diffusion_pytorch_model.safetensors.index.json", report)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        report.problems.append("diffusion_pytorch_model.safetensors.index.json has no weight_map")
        return
    wrong = [k for k, f in index["weight_map"].items() if tf.where.get(k) != f]
    unlisted = set(tf.where) - set(index["weight_map"])
    if wrong:
        report.problems.append(f"index.json maps {len(wrong)} tensor(s) to the wrong file: {_names(wrong)}")
    if unlisted:
        report.problems.append(f"index.json does not list {len(unlisted)} tensor(s) (older lightx2v reads only "
                               f"listed ones): {_names(unlisted)}")


_ST_DTYPES = {"I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16,
              "F32": torch.float32, "F64": torch.float64, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
              "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool, "I16": torch.int16}


def _check_dtypes_shapes(tf: TensorFiles, expected: dict, present: set, manifest: dict, report: Report) -> str | None:
    """Dtype and shape of every expected tensor present; returns the code scheme ("int8"/"fp8") or None."""
    float_dtype = contract.EXPORT_DTYPES.get(manifest.get("dtype"))
    if float_dtype is None:
        report.problems.append(f"manifest dtype={manifest.get('dtype')!r} is not valid; valid: {', '.join(contract.EXPORT_DTYPES)}")
    code_dtypes = {}
    for key in sorted(present & set(expected)):
        st_dtype, shape = tf.meta(key)
        dtype = _ST_DTYPES.get(st_dtype)
        exp = expected[key]
        if shape != exp.shape:
            report.problems.append(f"{key}: shape {list(shape)}, expected {list(exp.shape)}")
        if exp.kind == "codes":
            code_dtypes.setdefault(dtype, key)
            continue
        want = {"scale": torch.float32, "smooth": torch.float32, "float": float_dtype}[exp.kind]
        if want is not None and dtype != want:
            report.problems.append(f"{key}: dtype {dtype or st_dtype}, expected {want}"
                                   + (" (lightx2v reads scales as fp32)" if exp.kind == "scale" else ""))
    schemes = {contract.scheme_of_dtype(d) for d in code_dtypes}
    if None in schemes:
        bad = [f"{k} ({d})" for d, k in code_dtypes.items() if contract.scheme_of_dtype(d) is None]
        report.problems.append(f"quantized weights must be torch.int8 or torch.float8_e4m3fn codes: {_names(bad)}")
        return None
    if len(schemes) > 1:
        report.problems.append(f"quantized weights mix dtypes {sorted(map(str, code_dtypes))}; lightx2v runs one scheme")
        return None
    if not schemes:
        return None
    scheme = schemes.pop()
    fmt = FORMATS.get(manifest.get("format"))
    if fmt is None or fmt.lightx2v_scheme != scheme:
        report.problems.append(f"codes are {contract.CODE_DTYPES[scheme]} but the manifest's format is "
                               f"{manifest.get('format')!r}")
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
            report.notes.append(f"{len(unrounded)} smoothing vector(s) are not bf16-representable; lightx2v rounds "
                                f"them to bf16, a small difference from the fake-quant model (included in the check)")


# ---- block comparison ----------------------------------------------------------------------------------

@dataclass
class BlockInputs:
    x: torch.Tensor  # [1, L, D] bf16
    temb: torch.Tensor  # [1, 6, D] fp32
    context: torch.Tensor  # [1, Lc, D] bf16
    context_img: torch.Tensor | None  # [1, Li, D] bf16
    cos: torch.Tensor  # [1, L, 1, head_dim]
    sin: torch.Tensor

    def to(self, device) -> "BlockInputs":
        return BlockInputs(*(None if t is None else t.to(device) for t in
                             (self.x, self.temb, self.context, self.context_img, self.cos, self.sin)))


def block_inputs(dkw: dict, seed: int, text_len: int) -> BlockInputs:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    dim = dkw["num_attention_heads"] * dkw["attention_head_dim"]
    i2v = dkw.get("added_kv_proj_dim") is not None
    g = torch.Generator().manual_seed(seed)
    f, h, w = GRID
    x = torch.randn(1, f * h * w, dim, generator=g).to(torch.bfloat16)
    temb = torch.randn(1, 6, dim, generator=g) * 0.5
    context = torch.randn(1, text_len if i2v else min(text_len, TEXT_TOKENS_T2V), dim, generator=g).to(torch.bfloat16)
    context_img = torch.randn(1, IMAGE_TOKENS, dim, generator=g).to(torch.bfloat16) if i2v else None
    pt, ph, pw = dkw["patch_size"]
    rope = WanRotaryPosEmbed(dkw["attention_head_dim"], dkw["patch_size"], 1024)
    cos, sin = rope(torch.empty(1, 1, f * pt, h * ph, w * pw, device="meta"))
    return BlockInputs(x, temb, context, context_img, cos.float(), sin.float())


def run_diffusers_block(block: torch.nn.Module, inp: BlockInputs) -> torch.Tensor:
    device = next(block.parameters()).device
    i = inp.to(device)
    ctx = i.context if i.context_img is None else torch.cat([i.context_img, i.context], dim=1)  # image tokens first
    return block(i.x, ctx, i.temb, (i.cos, i.sin)).float().cpu()


class RebuiltTransformer:
    """diffusers' WanTransformer3DModel from config.json (meta device), materialized one block at a time from
    the export: float tensors as stored, quantized linears as QuantLinears of the exported codes and scales."""

    def __init__(self, tf: TensorFiles, dkw: dict, fmt, model_dtype: torch.dtype, report: Report):
        from diffusers import WanTransformer3DModel

        self.tf, self.fmt, self.dtype = tf, fmt, model_dtype
        self.keep_fp32 = set(WanTransformer3DModel._keep_in_fp32_modules)
        self.model = contract.meta_transformer(dkw)
        self.adapter = adapter_for(self.model)
        to_diffusers = self.adapter.diffusers_key
        rest = {to_diffusers(k): self._cast(to_diffusers(k), tf.get(k)) for k in tf.where if not k.startswith("blocks.")}
        result = self.model.load_state_dict(rest, strict=False, assign=True)
        missing = [k for k in result.missing_keys if not k.startswith("blocks.")]
        if missing or result.unexpected_keys:
            report.problems.append(f"non-block tensors do not map back onto diffusers' model: missing {_names(missing)}, "
                                   f"unexpected {_names(result.unexpected_keys)}")

    def _cast(self, diffusers_name: str, t: torch.Tensor) -> torch.Tensor:
        keep = self.keep_fp32.intersection(diffusers_name.split("."))
        return t.to(torch.float32 if keep else self.dtype)

    def block(self, index: int) -> torch.nn.Module:
        p = f"blocks.{index}."
        keys = [k for k in self.tf.where if k.startswith(p)]
        native = {k: self.tf.get(k) for k in keys}
        linears = {f"{p}{n}": local for local, n in self.adapter.block_linears(self.model).items()}
        state, smooth = {}, {}
        for k, t in native.items():
            rest = k[len(p):]
            if rest.startswith("affine_norm"):
                smooth[rest.split(".")[0]] = t.float()
                continue
            if k.endswith(".weight_scale"):
                continue
            name = self.adapter.diffusers_key(k)[len(p):]
            prefix = k.rpartition(".")[0]
            if prefix in linears and k.endswith(".weight"):  # dequantized exactly as QuantLinear does
                t = (t.float() * native[prefix + ".weight_scale"].float()).to(self.dtype)
            else:
                t = self._cast(name, t)
            state[name] = t
        block = self.adapter.blocks(self.model)[index]
        block.load_state_dict(state, strict=True, assign=True)
        folds = {n: g.fold for g in self.adapter.input_groups(self.model) if g.kind == "runtime" for n in g.linears}
        for prefix, local in linears.items():
            q = QuantLinear(block.get_submodule(local), self.fmt, native[prefix + ".weight"].float(),
                            native[prefix + ".weight_scale"].float())
            if folds.get(local) in smooth:  # the exact 1/s vector, as the evaluated QuantLinear held it
                del q.input_smooth_inv
                q.register_buffer("input_smooth_inv", smooth[folds[local]].contiguous())
            set_submodule(block, local, q)
        return block

    def release(self, index: int) -> None:
        self.adapter.blocks(self.model)[index].to_empty(device="meta")


def _model_dtype(manifest: dict) -> torch.dtype:
    name = ((manifest.get("run_config") or {}).get("model") or {}).get("dtype", "bfloat16")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name, torch.bfloat16)


def relative_update_error(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> float:
    """||out - ref|| / ||ref - x||: the difference relative to what the block adds to its input."""
    out, ref, x = out.float().reshape(-1), ref.float().reshape(-1), x.float().reshape(-1)
    denom = (ref - x).norm()
    err = (out - ref).norm()
    return float(err / denom) if denom > 0 else float(err)


def spread(n: int, k: int | None) -> list[int]:
    """``k`` block indices evenly spread over ``n`` (first and last included); all when k is None or >= n."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 1:
        return [0]
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def _lightx2v_block(tensors: dict, i: int, inp: BlockInputs, wan_cfg: dict, scheme: str, device) -> torch.Tensor:
    t = {k: v.to(device) for k, v in tensors.items()}
    d = inp.to(device)
    out = lightx2v_math.block_forward(
        t, i, d.x[0], d.temb[0], d.context[0], None if d.context_img is None else d.context_img[0], d.cos[0], d.sin[0],
        wan_cfg["num_heads"], float(wan_cfg["eps"]), scheme)
    return out.float().cpu()


def _compare_blocks(tf: TensorFiles, wan_cfg: dict, dkw: dict, scheme: str, manifest: dict, report: Report,
                    seed: int, reference: torch.nn.Module | None, device: str | None,
                    max_blocks: int | None) -> None:
    fmt = get_format(manifest["format"])
    inp = block_inputs(dkw, seed, int(wan_cfg["text_len"]))
    rebuilt = None if reference is not None else RebuiltTransformer(tf, dkw, fmt, _model_dtype(manifest), report)
    if report.problems:
        return
    if device in (None, "auto"):
        dev = next(reference.parameters()).device if reference is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    else:
        dev = torch.device(device)
    n = wan_cfg["num_layers"]
    code_keys = {f"{name}.weight" for name in contract.quantized_linears(contract.meta_transformer(dkw))}
    for i in tqdm(spread(n, max_blocks), desc="verify", unit="block", leave=False):
        tensors = lightx2v_math.loader_cast({k: tf.get(k) for k in tf.where if k.startswith(f"blocks.{i}.")}, code_keys)
        try:
            ours = _lightx2v_block(tensors, i, inp, wan_cfg, scheme, dev)
        except RuntimeError as e:  # e.g. fp8 _scaled_mm needs sm89+: the same math on CPU
            if dev.type == "cpu":
                raise
            report.notes.append(f"lightx2v's {scheme} GEMMs do not run on {dev} ({str(e).splitlines()[0][:120]}); "
                                f"compared on CPU")
            dev = torch.device("cpu")
            ours = _lightx2v_block(tensors, i, inp, wan_cfg, scheme, dev)
        if reference is not None:
            theirs = run_diffusers_block(adapter_for(reference).blocks(reference)[i], inp)
        else:
            theirs = run_diffusers_block(rebuilt.block(i).to(dev), inp)
            rebuilt.release(i)
        err = relative_update_error(ours, theirs[0], inp.x[0])
        report.block_errors[i] = err
        if not math.isfinite(err) or err > report.tolerance:
            report.problems.append(f"blocks.{i}: lightx2v's math on the exported tensors differs from the fake-quant "
                                   f"block by {err:.3g} (relative to the block's update; tolerance {report.tolerance:g})")


# ---- fake (dequantized diffusers) exports --------------------------------------------------------------

def _verify_fake(folder: Path, files: list[str], report: Report) -> None:
    from diffusers import WanTransformer3DModel

    config = _read_json(folder / "transformer" / "config.json", report)
    if config is None:
        return
    try:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config(config)
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"transformer/config.json does not build a WanTransformer3DModel ({str(e).splitlines()[0][:160]})")
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tf = TensorFiles(folder, files, report)
    present = set(tf.where)
    if set(expected) - present:
        report.problems.append(f"{len(set(expected) - present)} tensor(s) missing: {_names(set(expected) - present)}")
    if present - set(expected):
        report.problems.append(f"{len(present - set(expected))} unexpected tensor(s): {_names(present - set(expected))}")
    for k in sorted(present & set(expected)):
        shape = tf.meta(k)[1]
        if shape != expected[k]:
            report.problems.append(f"{k}: shape {list(shape)}, expected {list(expected[k])}")
        elif not torch.isfinite(tf.get(k).float()).all():
            report.problems.append(f"{k}: non-finite values")
    report.info.update({"blocks": config.get("num_layers"), "tensors": len(present)})
