"""``export=dequantized`` (formerly ``export=fake``): the quantized weights, dequantized, as a diffusers
``transformer/`` folder.

For tools that read no int8/fp8: ``WanTransformer3DModel.from_pretrained(<dir>/transformer)`` loads it. Each
quantized linear's weight is exactly the ``.weight`` its QuantLinear multiplied with (codes x scale in the
model's dtype); everything else is the transformer's own tensor. Activations are not quantized by a plain
diffusers model, so this reproduces the weight error only.

Runtime smoothing (lightx2v's affine_norm1/affine_norm3 vectors) cannot be expressed in diffusers' Wan block
(its modulated LayerNorms have no per-block parameters), so a recipe that may smooth there is refused before any
model is built (`export=torchao` carries those vectors); a run that left one anyway is refused before writing.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from ..errors import UserError
from ..models.adapter import adapter_named
from ..stages import EXPORTERS, Exporter, RunState
from .folder import check_target, hydra_run_dir, kept_summary, same_config_export, staged_folder, target_dir
from .checks import VERIFIERS, Report, TensorFiles, VerifyJob, names, read_json
from .manifest import write_manifest
from .schemas import DEQUANTIZED as KIND

log = logging.getLogger("vqx")
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def check(cfg: DictConfig) -> None:
    runtime = runtime_smoothing_groups(cfg)
    if runtime:
        kinds = adapter_named(cfg.model.family).smoothing_groups(cfg.model.task)
        exact = [g for g, kind in kinds.items() if kind != "runtime"]
        raise UserError(f"export={KIND} cannot hold run-time smoothing: algorithm={cfg.algorithm.name} may smooth "
                        f"{', '.join(runtime)}, whose factors are applied at run time (lightx2v's affine_norm vectors) "
                        f"and diffusers' Wan block has no place for them; use export=torchao (it carries them) or "
                        f"export=lightx2v, smooth only where the factor folds exactly "
                        f"(algorithm.groups=[{','.join(exact)}]), or algorithm=rtn / gptq")
    check_target(target_dir(cfg.export, hydra_run_dir()), bool(cfg.export.overwrite), cfg)


def runtime_smoothing_groups(cfg: DictConfig) -> list[str]:
    """The input groups with a run-time fold (Wan: before attn1's and the FFN's inputs) that the recipe's smoothing
    steps (those with a ``groups`` parameter) may smooth: their own ``groups``, or every smoothable group."""
    from ..algorithms.registry import plan_steps

    kinds = adapter_named(cfg.model.family).smoothing_groups(cfg.model.task)
    found: list[str] = []
    for planned in plan_steps(cfg.algorithm):
        if "groups" not in planned.step.param_fields():
            continue
        names = list(kinds) if planned.params.groups is None else list(planned.params.groups)
        found += [n for n in names if kinds.get(n) == "runtime" and n not in found]
    return found


def linear_state_dict(transformer: torch.nn.Module, weight_of) -> dict[str, torch.Tensor]:
    """diffusers names -> tensors (on the CPU): the transformer's own, with each quantized linear (a QuantLinear) as
    ``weight_of(name, quant_linear)`` and its bias; a weight of None is left out."""
    out = {}
    modules = dict(transformer.named_modules())
    quantized = {name for name, m in modules.items() if hasattr(m, "weight_codes")}
    for key, t in transformer.state_dict().items():
        prefix = key.rpartition(".")[0]
        if prefix in quantized:
            continue
        out[key] = t
    for name in quantized:
        q = modules[name]
        out[f"{name}.weight"] = weight_of(name, q)
        out[f"{name}.bias"] = q.bias
    return {k: v.detach().cpu().contiguous() for k, v in sorted(out.items()) if v is not None}


def dequantized_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers names -> tensors, with every quantized linear as its dequantized ``.weight`` and bias."""
    return linear_state_dict(transformer, lambda name, q: q.weight)


def export(state: RunState) -> dict:
    transformer = state.pipe.transformer
    smoothed = sorted(n for n, m in transformer.named_modules() if getattr(m, "input_smooth_inv", None) is not None)
    if state.runtime_smoothing or smoothed:
        raise UserError(f"export={KIND} cannot write this run: algorithm={state.cfg.algorithm.name} left runtime smoothing "
                        f"vectors (affine_norm1/affine_norm3, e.g. on {smoothed[0] if smoothed else 'its blocks'}) that "
                        f"diffusers' Wan block has no place for; use export=lightx2v, or an algorithm whose smoothing "
                        f"folds exactly")
    target = target_dir(state.cfg.export, state.run_dir)
    kept = None if state.cfg.export.overwrite else same_config_export(target, state.cfg)
    if kept is not None:
        return kept_summary(target, kept)
    with staged_folder(target, bool(state.cfg.export.overwrite)) as tmp, torch.no_grad():
        (tmp / "transformer").mkdir()
        tensors = dequantized_state_dict(transformer)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        transformer.save_config(str(tmp / "transformer"))
        info = {"format": state.format.name, "algorithm": state.cfg.algorithm.name, "model": state.cfg.model.name,
                "task": state.cfg.model.task, "dequantized_linears": len(state.quantized)}
        manifest = write_manifest(tmp, KIND, {WEIGHTS: len(tensors)}, info, state.cfg)
    log.info("dequantized diffusers transformer written to %s", target / "transformer")
    return {"kind": KIND, "dir": str(target), "files": len(manifest["files"]), "tensors": manifest["tensors"],
            "bytes": sum(f["bytes"] for f in manifest["files"].values())}


EXPORTERS.register(KIND)(Exporter(check=check, export=export))


@VERIFIERS.register("fake")  # folders exported before the rename
@VERIFIERS.register(KIND)
def verify_dequantized(job: VerifyJob, report: Report) -> None:
    """``transformer/config.json`` builds diffusers' model, whose every tensor the folder holds with its shape,
    finite; nothing else."""
    from diffusers import WanTransformer3DModel

    folder, files = job.folder, job.files
    config = read_json(folder / "transformer" / "config.json", report)
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
        report.problems.append(f"{len(set(expected) - present)} tensor(s) missing: {names(set(expected) - present)}")
    if present - set(expected):
        report.problems.append(f"{len(present - set(expected))} unexpected tensor(s): {names(present - set(expected))}")
    for k in sorted(present & set(expected)):
        shape = tf.meta(k)[1]
        if shape != expected[k]:
            report.problems.append(f"{k}: shape {list(shape)}, expected {list(expected[k])}")
        elif not torch.isfinite(tf.get(k).float()).all():
            report.problems.append(f"{k}: non-finite values")
    report.info.update({"blocks": config.get("num_layers"), "tensors": len(present)})
