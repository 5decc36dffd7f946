"""An ``export=lightx2v`` folder loaded back into a diffusers pipeline: the fake-quant model the run evaluated.

The folder is checked first, as `vqx verify-export` checks it without lightx2v's math (manifest, every file's
hash, names, dtypes and shapes). Then every quantized linear of the folder becomes a `QuantLinear` holding the
folder's codes, scales and bias (low-bit schemes unpacked by `lightx2v_lowbit_read`, with their calibrated
activation value), with the 1/s its ``affine_norm1/3`` vector carries (the very fp32 values the
run's layers multiplied by, not a reciprocal of a reciprocal); every other tensor is copied into the model. The
blocks get the fused forward `materialize` installs, so the pipeline computes what the run's quantized pipeline
computed, bit for bit (tests/test_api.py), given the same model dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from ..algorithms.materialize import materialize
from ..errors import UserError
from ..models.adapter import LayerSelection, adapter_for
from . import contract
from .checks import TensorFiles
from .folder import MANIFEST
from .lightx2v_lowbit import LOWBIT_SCHEMES
from .lightx2v_lowbit_read import expected_linear, read_linear
from .verify import verify_export


def load_lightx2v(folder: str | Path, pipe) -> dict:
    """Install the export in ``folder`` into ``pipe``'s transformer (in place); returns what was loaded:
    ``{"quantized": name -> QuantLinear, "scheme": "int8"|"fp8"|a low-bit scheme, "smoothing": bool}``."""
    folder = Path(folder)
    report = verify_export(folder, compute=False)
    if report.kind is not None and report.kind != "lightx2v":
        raise UserError(f"{folder} is an export={report.kind} folder; vqx.load reads export=lightx2v folders "
                        "(export=dequantized holds plain float weights: load them with diffusers)")
    if not report.ok:
        raise UserError(f"{folder} cannot be loaded: {report.problems[0]}")
    manifest = json.loads((folder / MANIFEST).read_text())
    files = sorted(n for n in manifest["files"] if n.endswith(".safetensors") and "/" not in n)
    tensors = TensorFiles(folder, files, SimpleNamespace(problems=[]))

    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    state = transformer.state_dict()
    targets = adapter.quant_targets(transformer, LayerSelection())
    lowbit = manifest.get("scheme") if manifest.get("scheme") in LOWBIT_SCHEMES else None
    schemes, codes, input_values, global_scales, taken = {}, {}, {}, {}, set()
    for t in targets:
        prefix = adapter.native_key(f"{t.name}.weight")[: -len(".weight")]
        if lowbit is not None:
            n, k = t.module.weight.shape
            suffixes = expected_linear(lowbit, n, k)
            for suffix in suffixes:
                _require(tensors, f"{prefix}.{suffix}", folder)
            got = read_linear(tensors.get, prefix, lowbit, n, k)
            schemes[t.name], codes[t.name] = LOWBIT_SCHEMES[lowbit], (got["codes"], got["scale"])
            if got["input_scale"] is not None:
                input_values[t.name] = got["input_scale"]
            if got["global_scale"] is not None:
                global_scales[t.name] = got["global_scale"]
            taken |= {f"{prefix}.{suffix}" for suffix in suffixes}
            continue
        weight = _tensor(tensors, f"{prefix}.weight", folder)
        family = contract.scheme_of_dtype(weight.dtype)
        if family is None:  # a layer the format kept float: an ordinary tensor, copied below
            continue
        schemes[t.name] = contract.LIGHTX2V_SCHEMES[family]
        codes[t.name] = (weight.float(), _tensor(tensors, f"{prefix}.weight_scale", folder).float())
        taken |= {f"{prefix}.weight", f"{prefix}.weight_scale"}
    smoothing = {}
    for key in tensors.where:
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "blocks" and parts[2] in contract.SMOOTH_VECTORS:
            taken.add(key)
            inv = tensors.get(key).float()
            if parts[3] == "weight" and not bool((inv == 1).all()):  # all ones: the run did not smooth that group
                smoothing.setdefault(int(parts[1]), {})[parts[2]] = inv

    for key in sorted(set(tensors.where) - taken):
        name = adapter.diffusers_key(key)
        if name not in state:
            raise UserError(f"{folder}: tensor {key} has no place in this {type(transformer).__name__}; load the "
                            "export into a pipeline of the model it was made from")
        value = tensors.get(key)
        if tuple(value.shape) != tuple(state[name].shape):
            raise UserError(f"{folder}: tensor {key} has shape {list(value.shape)}, this model's {name} has "
                            f"{list(state[name].shape)}; load the export into a pipeline of the model it was made from")
        with torch.no_grad():
            state[name].copy_(value.to(state[name].dtype))
    quantized_weights = {f"{t.name}.weight" for t in targets if t.name in schemes}
    missing = [n for n in state if n not in quantized_weights and adapter.native_key(n) not in tensors.where]
    if missing:
        raise UserError(f"{folder} holds no {adapter.native_key(missing[0])} ({len(missing)} of this model's tensors "
                        "are missing); load the export into a pipeline of the model it was made from")
    if not schemes:
        raise UserError(f"{folder} holds no quantized linear")

    chosen = [t for t in targets if t.name in schemes]
    runtime = {i: {v: 1.0 / inv for v, inv in vecs.items()} for i, vecs in smoothing.items()}
    quantized = materialize(transformer, chosen, schemes, codes, runtime, input_scales=input_values)
    for name, g in global_scales.items():  # the codes' own global scale (the float weight it came from is gone)
        quantized[name].weight_global_scale.copy_(g.to(quantized[name].weight_global_scale.device))
    fold_of = {n: g.fold for g in adapter.input_groups(transformer) if g.kind == "runtime" for n in g.linears}
    for t in chosen:  # the exported 1/s itself (1 / (1 / inv) need not round back to inv)
        q = quantized[t.name]
        if q.input_smooth_inv is not None:
            q.input_smooth_inv.copy_(smoothing[t.block][fold_of[t.local_name]].to(q.input_smooth_inv.device))
    return {"quantized": quantized, "scheme": lowbit or contract.lightx2v_family(next(iter(schemes.values()))),
            "smoothing": bool(smoothing)}


def _require(tensors: TensorFiles, key: str, folder: Path) -> None:
    if key not in tensors.where:
        raise UserError(f"{folder} holds no {key}; load the export into a pipeline of the model it was made from")


def _tensor(tensors: TensorFiles, key: str, folder: Path) -> torch.Tensor:
    _require(tensors, key, folder)
    return tensors.get(key)
