"""Load a Wan2.1 pipeline: built-in tiny models, or a local diffusers folder (never a hub id)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PIPELINE_CLASSES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}
REQUIRED_PARTS = {
    "t2v": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    "i2v": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder", "image_processor"),
}
WHERE_TO_GET = ("a local diffusers-format folder such as Wan2.1-T2V-1.3B-Diffusers (get it on a machine with "
                "network: huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR, then copy DIR here)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device={name} but no CUDA device is visible; use model.device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"model.device={name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None


def check_diffusers_folder(path: Path, task: str) -> None:
    if not path.is_dir():
        raise UserError(f"model.path={path} is not a folder; expected {WHERE_TO_GET}")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"model.path={path} has no model_index.json, so it is not a diffusers pipeline folder; expected {WHERE_TO_GET}")
    try:
        meta = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    want = PIPELINE_CLASSES[task]
    if meta.get("_class_name") != want:
        raise UserError(f"{index} declares {meta.get('_class_name')!r} but model.task={task} needs {want}; pick the model option that matches the folder")
    missing = [p for p in REQUIRED_PARTS[task] if not (path / p).is_dir()]
    if missing:
        raise UserError(f"model.path={path} lacks the subfolder(s) {', '.join(missing)}; expected {WHERE_TO_GET}")
    if not any((path / "transformer").glob("*.safetensors")):
        raise UserError(f"{path / 'transformer'} holds no .safetensors weights")


def load_pipeline(model: DictConfig):
    """The pipeline on ``model.device``; transformer in ``model.dtype``, VAE and encoders fp32 (VAE) as Wan runs them."""
    dtype = DTYPES[model.dtype]
    device = resolve_device(model.device)
    if model.source == "tiny":
        from .tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(model.task, seed=model.seed, dtype=dtype)
    else:
        pipe = _load_diffusers(Path(model.path).expanduser(), model.task, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_diffusers(path: Path, task: str, dtype: torch.dtype):
    import diffusers
    from diffusers import AutoencoderKLWan

    check_diffusers_folder(path, task)
    cls = getattr(diffusers, PIPELINE_CLASSES[task])
    try:
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        return cls.from_pretrained(path, vae=vae, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"could not load the pipeline from model.path={path}: {str(e).splitlines()[0]}") from None
