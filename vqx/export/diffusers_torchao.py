"""``export=torchao``: the quantized transformer as a diffusers folder that diffusers' own TorchAO quantizer loads,
for users who deploy with diffusers rather than lightx2v:

    transformer = WanTransformer3DModel.from_pretrained("<dir>/transformer", torch_dtype=torch.bfloat16)

Each quantized linear's weight is a torchao ``Int8Tensor`` holding exactly vqx's int8 codes and per-channel scales
(GPTQ's, AWQ's and SmoothQuant's choices included); ``config.json`` carries the ``quantization_config`` diffusers
reads (``Int8DynamicActivationInt8WeightConfig`` for ``w8a8``, ``Int8WeightOnlyConfig`` for ``w8a16``); the tensors
are torchao's flattened safetensors (torchao >= 0.16, diffusers' format). Run-time smoothing (SmoothQuant's and
AWQ's vectors at Wan's modulated norms, lightx2v's affine_norm1/3) travels as each weight's ``act_pre_scale``
(1/s; fp32 before int8 inputs), which torchao multiplies the input by before quantizing it: every vqx recipe
exports. diffusers loads torchao's int8 weights into bfloat16 models only.

What the loaded model computes is torchao's, not lightx2v's: its dynamic activation scale is absmax / 127.5 with
codes clamped to [-128, 127] (torchao's symmetric int8 mapping), where vqx's evaluation and lightx2v use
absmax / 127 and [-127, 127]; and it multiplies by 1/s in fp32 without vqx's 16-bit rounding of the smoothed input.
The weights are the evaluated model's bit for bit (`verify` checks it after loading the folder with diffusers); the
difference in the transformer's output is measured by the tests and `bench/torchao_export.py`.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from ..errors import UserError
from ..quant.formats import SCHEMES, format_from_config
from ..runtime import from_pretrained_dtype, torch_dtype
from ..stages import EXPORTERS, Exporter, RunState
from .checks import VERIFIERS, Report, VerifyJob, read_json
from .dequantized import linear_state_dict
from .folder import check_target, hydra_run_dir, kept_summary, same_config_export, staged_folder, target_dir
from .manifest import write_manifest
from .schemas import TORCHAO as KIND

log = logging.getLogger("vqx")
TRANSFORMER = "transformer"
WEIGHTS = f"{TRANSFORMER}/diffusion_pytorch_model.safetensors"
MIN_TORCHAO = (0, 16)  # flattened safetensors of tensor subclasses (diffusers reads them from this version on)
# vqx scheme -> the torchao config whose Int8Tensor computes it (dynamic per-token int8 inputs, or 16-bit inputs)
TORCHAO_CONFIGS = {"w8a8": "Int8DynamicActivationInt8WeightConfig", "w8a16": "Int8WeightOnlyConfig"}


def torchao_scheme(scheme) -> str | None:
    """The `TORCHAO_CONFIGS` key whose numbers ``scheme`` has (whatever its name), None: torchao has no such tensor."""
    return next((name for name in TORCHAO_CONFIGS
                 if (scheme.weight, scheme.activation) == (SCHEMES[name].weight, SCHEMES[name].activation)), None)


def torchao_version() -> tuple[int, int] | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = version("torchao").split(".")[:2]
    except PackageNotFoundError:
        return None
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _require_torchao() -> None:
    found = torchao_version()
    if found is None or found < MIN_TORCHAO:
        have = "it is not installed" if found is None else f"found {found[0]}.{found[1]}"
        raise UserError(f"export={KIND} needs torchao >= {MIN_TORCHAO[0]}.{MIN_TORCHAO[1]} ({have}); "
                        "pip install 'vqx[torchao]', or use export=lightx2v / export=dequantized")


def check(cfg: DictConfig) -> None:
    """Before any model is built: torchao, the format (int8 per channel, with int8 per-token or 16-bit inputs, on
    every quantized layer; layers kept float stay float) and the target folder."""
    _require_torchao()
    if cfg.model.dtype != "bfloat16":  # diffusers' TorchAO quantizer refuses int8 weights in another model dtype
        raise UserError(f"export={KIND} needs model.dtype=bfloat16 (diffusers loads torchao's int8 weights into "
                        f"bfloat16 models only), not {cfg.model.dtype}; or use export=lightx2v / export=dequantized")
    fmt = format_from_config(cfg.format)
    schemes = fmt.schemes()
    works = f"formats it writes: {', '.join(TORCHAO_CONFIGS)} (use export=lightx2v for fp8 and the low-bit formats)"
    if not schemes:
        raise UserError(f"export={KIND} cannot write format={fmt.name}: it quantizes nothing; {works}")
    kinds = {s.name: torchao_scheme(s) for s in schemes}
    bad = [name for name, kind in kinds.items() if kind is None]
    if bad:
        raise UserError(f"export={KIND} cannot write format={fmt.name}: torchao has no tensor for scheme {bad[0]}; {works}")
    if len(set(kinds.values())) > 1:
        raise UserError(f"export={KIND} cannot write format={fmt.name}: it mixes {', '.join(sorted(kinds))} and one "
                        f"diffusers quantization_config holds one torchao config; {works}")
    check_target(target_dir(cfg.export, hydra_run_dir()), bool(cfg.export.overwrite), cfg)


def torchao_weight(q: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The QuantLinear ``q`` as the torchao Int8Tensor that computes it: its codes and scales as they are, the
    activation quantization of its scheme, its run-time smoothing 1/s as ``act_pre_scale``."""
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    codes = q.weight_codes.to(torch.int8)
    act = QuantizeTensorToInt8Kwargs(granularity=PerRow()) if q.scheme.activation is not None else None
    return Int8Tensor(codes.contiguous(), q.weight_scale.float().reshape(-1, 1).contiguous(), [1, codes.shape[1]],
                      dtype, act_quant_kwargs=act, act_pre_scale=act_pre_scale(q, dtype))


def act_pre_scale(q: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """QuantLinear ``q``'s run-time 1/s as torchao multiplies the input by it: fp32 before int8 activations; in the
    model dtype for weight-only layers (torchao 0.18's weight-only path multiplies in the factor's dtype and then
    multiplies with the weight in the input's: an fp32 factor fails there)."""
    if q.input_smooth_inv is None:
        return None
    return q.input_smooth_inv.float().reshape(1, -1).to(torch.float32 if q.scheme.activation is not None else dtype)


def quantization_config(kind: str, float_linears: list[str]) -> dict:
    """The ``quantization_config`` of ``config.json``, as diffusers' TorchAoConfig writes it."""
    import torchao.quantization as tq
    from diffusers import TorchAoConfig

    return TorchAoConfig(getattr(tq, TORCHAO_CONFIGS[kind])(), modules_to_not_convert=float_linears or None).to_dict()


def export(state: RunState) -> dict:
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    transformer = state.pipe.transformer
    smoothed_float = sorted(n for n, m in transformer.named_modules()
                            if getattr(m, "input_smooth_inv", None) is not None and not hasattr(m, "weight_codes"))
    if smoothed_float:  # a float linear behind a smoothed input: no torchao tensor carries 1/s without codes
        raise UserError(f"export={KIND} cannot write this run: {smoothed_float[0]} stays float behind a run-time "
                        "smoothing vector; quantize it too (format rules), or use export=lightx2v")
    kind = torchao_scheme(next(iter(state.quantized.values())).scheme)
    dtype = torch_dtype(state.cfg.model.dtype)
    target = target_dir(state.cfg.export, state.run_dir)
    kept = None if state.cfg.export.overwrite else same_config_export(target, state.cfg)
    if kept is not None:
        return kept_summary(target, kept)
    # the linears left in 16 bits (QuantLinear is no nn.Linear), so a tool re-reading the config knows them
    float_linears = sorted(n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear))
    with staged_folder(target, bool(state.cfg.export.overwrite)) as tmp, torch.no_grad():
        (tmp / TRANSFORMER).mkdir()
        tensors = linear_state_dict(transformer, lambda name, q: torchao_weight(q, dtype))
        flat, metadata = flatten_tensor_state_dict(tensors)
        save_file({k: v.detach().cpu().contiguous() for k, v in flat.items()}, str(tmp / WEIGHTS), metadata=metadata)
        transformer.save_config(str(tmp / TRANSFORMER))  # then the quantization_config into it (diffusers' key)
        _add_quantization_config(tmp / TRANSFORMER / "config.json", quantization_config(kind, float_linears))
        info = {"format": state.format.name, "algorithm": state.cfg.algorithm.name, "model": state.cfg.model.name,
                "task": state.cfg.model.task, "torchao_config": TORCHAO_CONFIGS[kind], "dtype": state.cfg.model.dtype,
                "quantized_linears": len(state.quantized),
                "smoothed_linears": sum(q.input_smooth_inv is not None for q in state.quantized.values())}
        manifest = write_manifest(tmp, KIND, {WEIGHTS: len(flat)}, info, state.cfg)
        summary = {"kind": KIND, "dir": str(target), "files": len(manifest["files"]), "tensors": manifest["tensors"],
                   "bytes": sum(f["bytes"] for f in manifest["files"].values())}
        if state.cfg.export.verify:
            problems = compare_loaded(tmp, state)
            if problems:
                raise UserError(f"export={KIND}: the folder diffusers loads differs from the evaluated model: "
                                f"{problems[0]} ({len(problems)} problem(s); nothing was written)")
            summary["verify"] = {"ok": True, "compared_linears": len(state.quantized)}
    log.info("torchao diffusers transformer written to %s (%s)", target / TRANSFORMER, TORCHAO_CONFIGS[kind])
    return summary


def _add_quantization_config(path, quant: dict) -> None:
    import json

    from ..io import write_json_atomic

    config = json.loads(path.read_text())
    config["quantization_config"] = quant
    write_json_atomic(path, config)


def load_transformer(folder, dtype: str = "bfloat16", device: str = "cpu"):
    """The export's transformer as diffusers loads it (``from_pretrained`` with the folder's quantization_config;
    ``dtype`` the evaluated model's, which the manifest records: diffusers keeps its fp32 modules in fp32)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(str(folder / TRANSFORMER), **from_pretrained_dtype(torch_dtype(dtype)),
                                                 device_map=device)


def compare_loaded(folder, state: RunState) -> list[str]:
    """Load the folder with diffusers and compare it with the evaluated transformer: every quantized linear's codes,
    scales and 1/s bit for bit, its activation setting, every other tensor bit for bit."""
    from torchao.quantization import Int8Tensor

    dtype = torch_dtype(state.cfg.model.dtype)
    loaded = load_transformer(folder, state.cfg.model.dtype)
    problems = []
    modules = dict(loaded.named_modules())
    for name, q in state.quantized.items():
        w = getattr(modules.get(name), "weight", None)
        if not isinstance(w, Int8Tensor):
            problems.append(f"{name}.weight loads as {type(w).__name__}, not a torchao Int8Tensor")
            continue
        smooth = act_pre_scale(q, dtype)
        if not torch.equal(w.qdata.cpu(), q.weight_codes.to(torch.int8).cpu()):
            problems.append(f"{name}: int8 codes differ")
        elif not torch.equal(w.scale.float().cpu().flatten(), q.weight_scale.float().cpu().flatten()):
            problems.append(f"{name}: scales differ")
        elif (w.act_quant_kwargs is None) != (q.scheme.activation is None):
            problems.append(f"{name}: activation quantization {w.act_quant_kwargs} for scheme {q.scheme.name}")
        elif (smooth is None) != (w.act_pre_scale is None) or (smooth is not None and not torch.equal(
                w.act_pre_scale.cpu(), smooth.cpu())):
            problems.append(f"{name}: run-time smoothing (act_pre_scale) differs")
    expected = linear_state_dict(state.pipe.transformer, lambda name, q: None)
    got = loaded.state_dict()
    for key, t in expected.items():
        if t is None:
            continue
        if key not in got:
            problems.append(f"{key} missing")
        elif not torch.equal(got[key].cpu(), t.cpu()):
            problems.append(f"{key} differs ({got[key].dtype} vs {t.dtype})")
    return problems


EXPORTERS.register(KIND)(Exporter(check=check, export=export))


@VERIFIERS.register(KIND)
def verify_torchao(job: VerifyJob, report: Report) -> None:
    """``transformer/`` loads with diffusers' from_pretrained (its quantization_config: torchao); every Int8Tensor
    has int8 codes, finite positive scales and finite 1/s; every float tensor is finite."""
    from torchao.quantization import Int8Tensor

    config = read_json(job.folder / TRANSFORMER / "config.json", report)
    if config is None:
        return
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "torchao":
        report.problems.append(f"transformer/config.json: quantization_config.quant_method="
                               f"{quant.get('quant_method')!r}, expected 'torchao'")
        return
    try:
        model = load_transformer(job.folder, job.manifest.get("dtype", "bfloat16"))
    except Exception as e:  # noqa: BLE001  (any loader failure is the finding)
        report.problems.append(f"diffusers cannot load transformer/ ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return
    count = 0
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, Int8Tensor):
            count += 1
            if w.qdata.dtype != torch.int8:
                report.problems.append(f"{name}: codes are {w.qdata.dtype}, expected int8")
            if not (torch.isfinite(w.scale).all() and (w.scale > 0).all()):
                report.problems.append(f"{name}: scales not finite and positive")
            if w.act_pre_scale is not None and not torch.isfinite(w.act_pre_scale).all():
                report.problems.append(f"{name}: act_pre_scale not finite")
    for key, t in model.state_dict().items():
        if not isinstance(t, Int8Tensor) and t.is_floating_point() and not torch.isfinite(t.float()).all():
            report.problems.append(f"{key}: non-finite values")
    if count == 0:
        report.problems.append("no torchao Int8Tensor weight: the folder holds no quantized linear")
    report.info.update({"blocks": config.get("num_layers"), "quantized_linears": count})
