"""`vqx.load` for the exports diffusers loads itself (``export=torchao``, ``export=dequantized``): the folder's
``transformer/`` through ``from_pretrained``, in place of the pipeline's transformer."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .manifest import check_files, read_manifest
from .schemas import DEQUANTIZED, TORCHAO

DIFFUSERS_KINDS = (TORCHAO, DEQUANTIZED, "fake")  # "fake": dequantized folders exported before the rename


def export_kind(folder: Path) -> str | None:
    """The manifest's ``kind`` (None: no readable manifest; the loader then says why)."""
    manifest, _ = read_manifest(folder)
    return None if manifest is None else manifest.get("kind")


def load_diffusers_export(folder: Path, pipe) -> None:
    """``pipe.transformer`` := the folder's transformer (its manifest's model dtype, the old transformer's device)."""
    from diffusers import WanTransformer3DModel

    from ..runtime import from_pretrained_dtype, torch_dtype

    # the manifest's files and hashes; the kind's verifier would load the model once more, from_pretrained does below
    manifest, problems = read_manifest(folder)
    problems = problems or check_files(folder, manifest)
    if problems:
        raise UserError(f"{folder} cannot be loaded: {problems[0]}")
    dtype = manifest.get("dtype") or manifest.get("run_config", {}).get("model", {}).get("dtype", "bfloat16")
    old = pipe.transformer
    differs = _config_difference(folder, old)
    if differs:
        raise UserError(f"{folder} holds a transformer with {differs}; load the export into a pipeline of the model it "
                        "was made from")
    device = next(old.parameters()).device
    pipe.transformer = WanTransformer3DModel.from_pretrained(str(folder / "transformer"),
                                                             **from_pretrained_dtype(torch_dtype(dtype)),
                                                             device_map=str(device))


def _config_difference(folder: Path, transformer) -> str | None:
    """The first architecture setting in which the folder's transformer differs from ``transformer`` (None: none)."""
    import json

    config = json.loads((folder / "transformer" / "config.json").read_text())
    for key, value in config.items():
        if key.startswith("_") or key == "quantization_config" or key not in transformer.config:
            continue
        have = transformer.config[key]
        if (list(have) if isinstance(have, tuple) else have) != value:
            return f"{key}={value!r} (the pipeline's: {have!r})"
    return None
