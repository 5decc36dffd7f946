"""``export=lightx2v``: the quantized transformer as a checkpoint lightx2v loads as is, checked before it lands.

What is written (docs/lightx2v-contract.md), into ``export.dir`` (default ``<run_dir>/export``):
- native Wan2.1 tensor names; every block linear as int8 / float8_e4m3fn codes [out, in], ``weight_scale``
  fp32 [out, 1] (bf16-representable) and a float bias, or under a low-bit scheme (nvfp4, mxfp8, mxfp6-mxfp8,
  mxfp4, fp8-pertensor, fp8-b128-deepgemm) the tensors `lightx2v_lowbit` builds; every other tensor as the
  evaluated model holds it:
  fp32 where it keeps fp32 (modulation, time embedding, affine norms), else in ``export.dtype``;
- with runtime smoothing, ``blocks.N.affine_norm1/3.{weight,bias}`` = the 1/s the fake-quant model applied
  (fp32 [D], all ones for a block or group that was not smoothed, because lightx2v then reads them for
  every block), and ``"quant_method": "advanced_ptq"`` in ``config.json``. The flag is written exactly when
  the vectors are: without it lightx2v ignores them (wrong videos, no error); with it but without them it
  looks up tensors that are not there;
- ``config.json`` (Wan2.1's keys + model_type, merged by lightx2v), lightx2v run-config fragments for the
  current and the pre-2025-10 API, ``LIGHTX2V.md``, and ``manifest.json`` last;
- ``export.layout=single``: one ``diffusion_pytorch_model.safetensors``; ``blocks``: ``block_{i}.safetensors``
  + ``non_block.safetensors`` (disk offload); both with ``diffusion_pytorch_model.safetensors.index.json``,
  the only way lightx2v versions of 2025-06-16 to 2025-10-17 (``mm_config``) load a folder;
- ``reference/block_outputs.safetensors`` (`lightx2v_reference`): the evaluated model's own block outputs on
  seeded inputs, in fp32, so `vqx verify-export` can check the folder's values on its own, any time; for a
  low-bit scheme (whose matmul vqx does not emulate yet) ``reference/weights.json`` instead: each linear's
  evaluated fp32 weight by hash and its calibrated activation value.
The codes and scales are the QuantLinear buffers themselves, so dequantizing them gives bit for bit the
weights the fake-quant model used. Before the folder is renamed into place, `verify.verify_export` checks it
and compares lightx2v's math on the files with the recorded outputs (``export.verify``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import Fault, UserError
from ..io import write_json_atomic, write_text_atomic
from ..models.adapter import LayerSelection, ModelAdapter, adapter_for, quant_targets
from ..quant.formats import Format, format_from_config
from ..quant.linear import QuantLinear
from ..stages import EXPORTERS, Exporter, RunState
from . import contract, lightx2v_reference
from .block_compare import spread
from .folder import check_target, hydra_run_dir, kept_summary, same_config_export, staged_folder, target_dir
from .lightx2v_attention import attention_keys, attention_notes
from .lightx2v_lowbit import LOWBIT_SCHEMES, linear_tensors, lowbit_scheme, marlin_check_shape
from .lightx2v_reference import REFERENCE_FILE, WEIGHTS_FILE
from .manifest import write_manifest
from .verify import verify_export

log = logging.getLogger("vqx")

SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
NON_BLOCK_FILE = "non_block.safetensors"


def refusal(fmt: Format) -> str | None:
    """Why lightx2v cannot load this format (None: it can): one scheme it has a kernel for, on every layer."""
    schemes = fmt.schemes()
    writable = [*contract.LIGHTX2V_SCHEMES.values(), *LOWBIT_SCHEMES.values()]
    loads = f"formats lightx2v loads: {', '.join(s.name for s in writable)} (or use export=dequantized / export=none)"
    if not schemes:
        why = "it quantizes nothing"
    elif len(schemes) > 1:
        why = (f"it mixes schemes {', '.join(s.name for s in schemes)} and lightx2v runs one scheme per checkpoint")
    elif lightx2v_scheme(schemes[0]) is not None:
        return None
    else:
        s = schemes[0]
        if s.weight_grid.storage_dtype is None:
            why = f"{s.weight.grid} is a research grid with no storage dtype (fake-quant only)"
        elif s.activation is None:
            why = "it is weight-only and lightx2v has no 16-bit-activation scheme for this checkpoint"
        else:
            why = f"lightx2v has no scheme for {s.name} ({s.weight.describe()} weights)"
    return f"export=lightx2v cannot write format={fmt.name}: {why}; {loads}"


def lightx2v_scheme(scheme) -> str | None:
    """The lightx2v scheme an export of ``scheme`` is written for: "int8" / "fp8" (per-channel, several kernels
    read it) or a low-bit scheme's own name ("nvfp4", "mxfp8", ...); None: lightx2v has none vqx writes."""
    return contract.lightx2v_family(scheme) or lowbit_scheme(scheme)


def check(cfg: DictConfig) -> None:
    """Before any model is built: the format, the layer selection and the target folder."""
    fmt = format_from_config(cfg.format)
    reason = refusal(fmt)
    if reason:
        raise UserError(reason)
    f = cfg.format
    skipped = [f"{k}={f[k]}" for k in ("skip_first_blocks", "skip_last_blocks") if f[k]]
    if list(f.skip_patterns):
        skipped.append(f"skip_patterns={list(f.skip_patterns)}")
    if not skipped and fmt.keeps_float:
        skipped.append(f"rules={[{'pattern': r.pattern, 'scheme': r.scheme.name if r.scheme else 'none'} for r in fmt.rules]}")
    if skipped:
        raise UserError(f"export=lightx2v needs every block linear quantized (lightx2v's quantized mode reads codes "
                        f"for all of them) but format.{', format.'.join(skipped)} keeps some float; "
                        f"drop those settings or use export=dequantized")
    check_target(target_dir(cfg.export, hydra_run_dir()), bool(cfg.export.overwrite), cfg)


# ---- building the native tensors ----------------------------------------------------------------------

def _quant_linears(block: torch.nn.Module, index: int, linears: dict[str, str], family: str) -> dict[str, QuantLinear]:
    """Block-relative diffusers name -> QuantLinear, refusing a block linear that is not quantized."""
    want = contract.CODE_DTYPES.get(family)  # None: a low-bit scheme (its tensors are built per layer)
    out = {}
    for local in linears:
        q = block.get_submodule(local)
        if not isinstance(q, QuantLinear):
            raise UserError(f"blocks.{index}.{local} is not quantized ({type(q).__name__}); lightx2v reads codes for "
                            f"every block linear, so export=lightx2v needs them all quantized")
        if (want is not None and q.weight_codes.dtype != want) or q.bias is None or lightx2v_scheme(q.scheme) != family:
            raise Fault(f"blocks.{index}.{local} holds {q.weight_codes.dtype} codes of scheme {q.scheme.name} "
                        f"(bias: {q.bias is not None}); lightx2v {family} reads {want} codes of one scheme with a bias")
        out[local] = q
    return out


def smoothing_vectors(transformer: torch.nn.Module, runtime_smoothing: dict[int, dict[str, torch.Tensor]],
                      ) -> dict[int, dict[str, torch.Tensor]]:
    """Block -> {"affine_norm1"|"affine_norm3": 1/s fp32} as the QuantLinears applied it, or {} when the run
    has no runtime smoothing. Unsmoothed groups get ones (lightx2v reads the vectors of every block)."""
    adapter = adapter_for(transformer)
    groups = [g for g in adapter.input_groups(transformer) if g.kind == "runtime"]
    found: dict[int, dict[str, torch.Tensor | None]] = {}
    for i, block in enumerate(adapter.blocks(transformer)):
        found[i] = {}
        for g in groups:
            invs = [getattr(block.get_submodule(n), "input_smooth_inv", None) for n in g.linears]
            inv = invs[0]
            if any((v is None) != (inv is None) or (v is not None and not torch.equal(v, inv)) for v in invs):
                raise Fault(f"blocks.{i} {g.name}: its linears {', '.join(g.linears)} apply different smoothing "
                            f"vectors, which one lightx2v {g.fold} vector cannot express")
            s = runtime_smoothing.get(i, {}).get(g.fold)
            if (s is None) != (inv is None):
                raise Fault(f"blocks.{i} {g.fold}: the run's runtime smoothing and its quantized linears disagree")
            found[i][g.fold] = None if inv is None else inv.detach().float().cpu()
    if not any(v is not None for f in found.values() for v in f.values()):
        return {}
    dim = adapter.hidden_size(transformer)
    return {i: {fold: (v if v is not None else torch.ones(dim)).contiguous() for fold, v in f.items()}
            for i, f in found.items()}


def block_tensors(adapter: ModelAdapter, block: torch.nn.Module, index: int, linears: dict[str, str], family: str,
                  dtype: torch.dtype, smoothing: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Native name -> tensor (CPU, contiguous) for one block (``linears``: `ModelAdapter.block_linears`)."""
    quant = _quant_linears(block, index, linears, family)
    out: dict[str, torch.Tensor] = {}
    for local, q in quant.items():
        p = f"blocks.{index}.{linears[local]}"
        if family in LOWBIT_SCHEMES:
            try:
                out.update(linear_tensors(q, p))
            except ValueError as e:
                raise Fault(f"{e}") from None
            out[f"{p}.bias"] = _float(q.bias, dtype)
            continue
        out[f"{p}.weight"] = q.weight_codes.detach().cpu().contiguous()
        scale = q.weight_scale.detach().to(torch.float32).cpu().reshape(-1, 1).contiguous()
        if not torch.equal(scale.to(torch.bfloat16).float(), scale):  # lightx2v reads scales through bf16
            raise Fault(f"blocks.{index}.{local}: weight scales are not bf16-representable; the codes were chosen "
                        f"for scales lightx2v cannot hold")
        out[f"{p}.weight_scale"] = scale
        out[f"{p}.bias"] = _float(q.bias, dtype)
    for key, t in block.state_dict().items():
        if any(key.startswith(local + ".") for local in quant):
            continue  # codes, scale, input_smooth_inv: written above or as affine_norm vectors
        out[adapter.native_key(f"{adapter.block_name(index)}.{key}")] = _float(t, dtype)
    for vec, inv in (smoothing or {}).items():
        out[f"blocks.{index}.{vec}.weight"] = inv.clone()
        out[f"blocks.{index}.{vec}.bias"] = inv.clone()  # h = LN(x)(1+scale)a + shift b: both 1/s
    return out


def _float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(contract.stored_dtype(t.dtype, dtype)).cpu().contiguous()


def non_block_tensors(transformer: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    adapter = adapter_for(transformer)
    return {adapter.native_key(k): _float(t, dtype)
            for k, t in transformer.state_dict().items() if not k.startswith(adapter.blocks_attr + ".")}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> int:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_checkpoint(transformer: torch.nn.Module, folder: Path, family: str, layout: str, dtype: torch.dtype,
                     smoothing: dict[int, dict[str, torch.Tensor]]) -> dict[str, int]:
    """Write the tensor files into ``folder``; returns file name -> tensor count."""
    adapter = adapter_for(transformer)
    linears = adapter.block_linears(transformer)
    counts: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    total = 0
    pending: dict[str, torch.Tensor] = {}
    blocks = adapter.blocks(transformer)
    for i in tqdm(range(len(blocks)), desc="export", unit="block", leave=False):
        tensors = block_tensors(adapter, blocks[i], i, linears, family, dtype, smoothing.get(i))
        if layout == "blocks":
            name = f"block_{i}.safetensors"
            total += _save(tensors, folder / name)
            counts[name] = len(tensors)
            weight_map.update(dict.fromkeys(tensors, name))
        else:
            pending.update(tensors)
    rest = non_block_tensors(transformer, dtype)
    if layout == "blocks":
        total += _save(rest, folder / NON_BLOCK_FILE)
        counts[NON_BLOCK_FILE] = len(rest)
        weight_map.update(dict.fromkeys(rest, NON_BLOCK_FILE))
    else:
        pending.update(rest)
        total += _save(pending, folder / SINGLE_FILE)
        counts[SINGLE_FILE] = len(pending)
        weight_map.update(dict.fromkeys(pending, SINGLE_FILE))
    # lightx2v 2025-06-16..2025-10-17 (mm_config) loads a folder only through this index, whatever the layout
    write_json_atomic(folder / INDEX_FILE, {"metadata": {"total_size": total},
                                            "weight_map": dict(sorted(weight_map.items()))})
    return counts


LOWBIT_GPUS = {  # what runs each low-bit scheme's lightx2v kernels (docs/lightx2v-lowbit-contract.md)
    "nvfp4": "lightx2v_kernel's NVFP4 GEMM, built for sm_120a (RTX 50-class) only",
    "mxfp8": "lightx2v_kernel's MX GEMMs, built for sm_120a (RTX 50-class) only",
    "mxfp6-mxfp8": "lightx2v_kernel's MX GEMMs, built for sm_120a (RTX 50-class) only",
    "mxfp4": "lightx2v_kernel's MX GEMMs, built for sm_120a (RTX 50-class) only",
    "fp8-pertensor": "FP8 tensor cores (Ada, Hopper, Blackwell)",
    "fp8-b128-deepgemm": "DeepGEMM's block-scaled FP8 GEMM (Hopper)",
    "int4-g128-marlin": "Marlin's int4 x fp16 GEMM (Ampere and later: A100, H100/H200, RTX 30/40)",
}


def deployment_gpus(fmt: Format) -> str | None:
    """Which GPUs run ``fmt`` in lightx2v, for a low-bit format vqx only emulates (None otherwise)."""
    schemes = fmt.schemes()
    name = lightx2v_scheme(schemes[0]) if len(schemes) == 1 else None
    return LOWBIT_GPUS.get(name)


def usage_text(scheme: str, target: Path, smoothing: bool, task: str) -> str:
    if scheme in LOWBIT_SCHEMES:
        return (f"# lightx2v checkpoint (Wan2.1 {task}, scheme `{scheme}`, vqx format {LOWBIT_SCHEMES[scheme].name})\n\n"
                f"Runs on: {LOWBIT_GPUS[scheme]}.\n"
                f"On other GPUs vqx evaluates it with fake quantization (the numbers of lightx2v's reference\n"
                f"quantizers), not lightx2v's kernels.\n\n"
                f"Merge `lightx2v_config.json` into a Wan2.1 {task} run config; `model_path` stays the original Wan2.1\n"
                f"folder; `dit_quantized_ckpt` is this folder:\n\n    {target}\n\n"
                + ("The checkpoint carries per-block smoothing vectors (affine_norm1/affine_norm3) and `config.json`\n"
                   "sets `\"quant_method\": \"advanced_ptq\"`.\n\n" if smoothing else "")
                + f"Check it any time with `vqx verify-export {target}` (the unpacked weights against the evaluated ones,\n"
                f"bit for bit, and the recorded blocks computed from them with the scheme's activation quantization).\n")
    flag = ("\nThe checkpoint carries per-block smoothing vectors (affine_norm1/affine_norm3): `config.json` here sets\n"
            "`\"quant_method\": \"advanced_ptq\"` and lightx2v merges it because `dit_quantized_ckpt` points at this folder.\n"
            "Do not point it at a single file, or copy the flag into your run config (the fragments here carry it).\n"
            if smoothing else "")
    return (f"# lightx2v checkpoint (Wan2.1 {task}, {scheme} per-channel weights, per-token dynamic activations)\n\n"
            f"Schemes that read this checkpoint: {', '.join(contract.SCHEMES[scheme])}.\n"
            f"From 2025-06-16 to 2025-10-17 lightx2v named them by mm_type: `{contract.LEGACY_MM_TYPE[scheme]}`.\n\n"
            f"Merge `lightx2v_config.json` (current API) or `lightx2v_config_pre2025-10.json` into a Wan2.1 {task}\n"
            f"run config; `model_path` stays the original Wan2.1 folder (T5, VAE, CLIP, its config.json);\n"
            f"`dit_quantized_ckpt` is this folder:\n\n    {target}\n{flag}\n"
            f"Check it any time with `vqx verify-export {target}`.\n")


# ---- the exporter -------------------------------------------------------------------------------------

def export(state: RunState) -> dict:
    cfg, ecfg, fmt = state.cfg, state.cfg.export, state.format
    reason = refusal(fmt)
    if reason:
        raise UserError(reason)
    transformer = state.pipe.transformer
    adapter = adapter_for(transformer)
    task = "i2v" if adapter.is_i2v(transformer) else "t2v"
    target = target_dir(ecfg, state.run_dir)
    scheme = lightx2v_scheme(fmt.schemes()[0])
    dtype = contract.EXPORT_DTYPES[ecfg.dtype]
    smoothing = smoothing_vectors(transformer, state.runtime_smoothing or {})
    wan_cfg = contract.wan_config(dict(transformer.config), task, bool(smoothing))
    kept = None if ecfg.overwrite else same_config_export(target, cfg)
    if kept is not None:  # verified when it was written; its files were just checked against their hashes
        return {**kept_summary(target, kept), "verify": {"ok": True, "kept": True}}
    verify_report = None
    with staged_folder(target, bool(ecfg.overwrite)) as tmp, torch.no_grad():
        counts = write_checkpoint(transformer, tmp, scheme, ecfg.layout, dtype, smoothing)
        write_json_atomic(tmp / "config.json", wan_cfg)
        for name, body in contract.run_configs(scheme, str(target), bool(smoothing)).items():
            write_json_atomic(tmp / name, {**body, **attention_keys(cfg.get("attention"), task)})
        write_text_atomic(tmp / "LIGHTX2V.md", usage_text(scheme, target, bool(smoothing), task)
                          + attention_notes(cfg.get("attention"), task))
        info = {"format": fmt.name, "algorithm": cfg.algorithm.name, "model": cfg.model.name, "task": task,
                "layout": ecfg.layout, "dtype": ecfg.dtype, "scheme": scheme, "schemes": contract.SCHEMES.get(scheme, [scheme]),
                "advanced_ptq": bool(smoothing), "num_layers": len(adapter.blocks(transformer))}
        if scheme in LOWBIT_SCHEMES:
            lightx2v_reference.record_weights(transformer, tmp / WEIGHTS_FILE)
        blocks = spread(info["num_layers"], ecfg.verify_blocks)
        lightx2v_reference.record(transformer, tmp / REFERENCE_FILE, blocks, seed=0, scheme=scheme)
        manifest = write_manifest(tmp, "lightx2v", counts, info, cfg)
        if ecfg.verify:
            verify_report = verify_export(tmp, tolerance=float(ecfg.verify_tolerance),
                                          device=str(next(transformer.parameters()).device))
            if not verify_report.ok:
                raise Fault(f"the lightx2v export failed its own check, so nothing was written to {target}: "
                            + "; ".join(verify_report.problems[:5]))
    total_bytes = sum(f["bytes"] for f in manifest["files"].values())
    log.info("lightx2v checkpoint (%s, %s layout, %s%s) written to %s", scheme, ecfg.layout, task,
             ", advanced_ptq" if smoothing else "", target)
    summary = {"kind": "lightx2v", "dir": str(target), "layout": ecfg.layout, "scheme": scheme,
               "schemes": contract.SCHEMES.get(scheme, [scheme]), "advanced_ptq": bool(smoothing),
               "files": len(manifest["files"]), "tensors": manifest["tensors"], "bytes": total_bytes}
    if verify_report is not None:
        summary["verify"] = verify_report.summary()
    return summary


def check_model(cfg: DictConfig, transformer: torch.nn.Module) -> None:
    """Once the model is loaded, before calibration: the layer shapes the scheme's kernel needs (Marlin's)."""
    schemes = format_from_config(cfg.format).schemes()
    if len(schemes) != 1 or lowbit_scheme(schemes[0]) != "int4-g128-marlin":
        return
    for t in quant_targets(transformer, LayerSelection()):
        why = marlin_check_shape(t.module.out_features, t.module.in_features)
        if why:
            raise UserError(f"export=lightx2v cannot write format={cfg.format.name} for this model: {t.name}: {why} "
                            f"(every Wan2.1 size fits; use export=dequantized or export=none)")


EXPORTERS.register("lightx2v")(Exporter(check=check, export=export, check_model=check_model))
