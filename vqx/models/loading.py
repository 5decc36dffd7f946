"""Load a Wan2.1 pipeline: built-in tiny models, or a local diffusers folder (never a hub id)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..errors import UserError, one_line

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PIPELINE_CLASSES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}
REQUIRED_PARTS = {
    "t2v": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    "i2v": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder", "image_processor"),
}
WHERE_TO_GET = ("a local diffusers-format folder such as Wan2.1-T2V-1.3B-Diffusers (get it on a machine with "
                "network: huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR, then copy DIR here)")


def resolve_device(name: str, option: str = "model.device=") -> torch.device:
    """``name`` (auto | cpu | cuda | cuda:N) as a device; ``option`` is how errors spell the setting."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option}{name} but no CUDA device is visible; use {option}cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}{name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None


def check_diffusers_folder(path: Path, task: str) -> None:
    if not path.is_dir():
        raise UserError(f"model.path={path} is not a folder; expected {WHERE_TO_GET}")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"model.path={path} has no model_index.json, so it is not a diffusers pipeline folder; expected {WHERE_TO_GET}")
    try:
        meta = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); copy it again from the "
                        "original model folder") from None
    want = PIPELINE_CLASSES[task]
    if meta.get("_class_name") != want:
        raise UserError(f"{index} declares {meta.get('_class_name')!r} but model.task={task} needs {want}; pick the model option that matches the folder")
    missing = [p for p in REQUIRED_PARTS[task] if not (path / p).is_dir()]
    if missing:
        raise UserError(f"model.path={path} lacks the subfolder(s) {', '.join(missing)}; expected {WHERE_TO_GET}")
    if not any((path / "transformer").glob("*.safetensors")):
        raise UserError(f"{path / 'transformer'} holds no .safetensors weights; copy them from the original model "
                        "folder (vqx reads safetensors only; .bin checkpoints are not loaded)")
    for part in REQUIRED_PARTS[task]:  # headers only: catches an interrupted copy in seconds, before loading
        for file in sorted((path / part).glob("*.safetensors")):
            safetensors_header(file)
    check_transformer_matches_config(path / "transformer")


RECOPY = "copy the file again from the original model folder (an interrupted download or copy leaves it short)"


def safetensors_header(file: Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file, after checking that the file is as long as it says."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UserError(f"{file} is truncated or not a safetensors file ({size} bytes, no complete header); {RECOPY}")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
            raise UserError(f"{file} has a corrupt safetensors header; {RECOPY}") from None
    if size != 8 + n + end:
        raise UserError(f"{file} is truncated or corrupt: its header describes {8 + n + end} bytes but the file has "
                        f"{size}; {RECOPY}")
    return tensors


def check_transformer_matches_config(folder: Path) -> None:
    """transformer/config.json and its weights must describe the same model: every tensor present, none extra,
    same shapes. diffusers would otherwise fail with a meta-tensor error or, with fewer layers in the config,
    silently drop the extra blocks."""
    from diffusers import WanTransformer3DModel

    try:
        config = json.loads((folder / "config.json").read_text())
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config(config)
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json; copy it from the original model folder") from None
    except Exception as e:  # noqa: BLE001 -- bad JSON or keys diffusers rejects: the config is unusable
        raise UserError(f"{folder / 'config.json'} is not a valid WanTransformer3DModel config ({one_line(str(e))[:200]}); "
                        "copy it from the original model folder") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update({k: tuple(v["shape"]) for k, v in safetensors_header(file).items()})
    fix = f"{folder / 'config.json'} does not describe these weights; use the config.json that came with them"
    missing = sorted(set(expected) - set(found))
    if missing:
        raise UserError(f"the transformer weights lack {len(missing)} tensor(s) the config needs (first: {missing[0]}); {fix}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise UserError(f"the transformer weights hold {len(extra)} tensor(s) the config has no place for (first: {extra[0]}); {fix}")
    for k, shape in expected.items():
        if found[k] != shape:
            raise UserError(f"transformer tensor {k} has shape {list(found[k])} in the weights but {list(shape)} by the config; {fix}")


def check_finite_weights(transformer) -> None:
    """A NaN/Inf weight would surface an hour later as NaN activations; name the first bad tensor now."""
    for name, p in list(transformer.named_parameters()) + list(transformer.named_buffers()):
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            hint = (" or a value too large for float16: try model.dtype=bfloat16" if p.dtype == torch.float16 else "")
            raise UserError(f"transformer weight {name} holds {bad} NaN/Inf value(s); the checkpoint is corrupt{hint} -- "
                            "copy it again from the original model")


def load_pipeline(model: DictConfig):
    """The pipeline on ``model.device``; transformer in ``model.dtype``, VAE and encoders fp32 (VAE) as Wan runs them."""
    dtype = DTYPES[model.dtype]
    device = resolve_device(model.device)
    if model.source == "tiny":
        from .wan.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(model.task, seed=model.seed, dtype=dtype)
    elif model.source == "synthetic":
        from .wan.synthetic import build_synthetic_pipeline

        # built on the device: random init of 14B on a CPU takes minutes (the .to(device) below is then a no-op)
        pipe = build_synthetic_pipeline(model.arch, dtype, device, model.num_layers, seed=model.seed)
    else:
        if model.source == "mini":  # says how to train it; then the checks of any diffusers folder apply
            from ..testbed.folder import check_mini_folder

            check_mini_folder(Path(model.path).expanduser())
        pipe = _load_diffusers(Path(model.path).expanduser(), model.task, dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if model.source in ("diffusers", "mini"):
        check_finite_weights(pipe.transformer)  # on the device: fast even for 14B
    outliers = model.get("outliers")
    if outliers and outliers.channels:
        from .wan.outliers import inject_outliers

        inject_outliers(pipe.transformer, int(outliers.channels), float(outliers.scale), int(outliers.seed))
    return pipe


def _load_diffusers(path: Path, task: str, dtype: torch.dtype):
    import diffusers
    from diffusers import AutoencoderKLWan

    check_diffusers_folder(path, task)
    cls = getattr(diffusers, PIPELINE_CLASSES[task])
    try:
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        return cls.from_pretrained(path, vae=vae, torch_dtype=dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever diffusers raises for a bad folder: one line naming it
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            raise  # not the folder's fault: reported with what to reduce
        raise UserError(f"could not load the pipeline from model.path={path}: {one_line(str(e))[:400]} -- check that "
                        "the folder is a complete copy of a Wan2.1 diffusers model") from None
