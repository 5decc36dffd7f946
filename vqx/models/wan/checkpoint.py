"""Wan2.1 checkpoints: loading a local diffusers pipeline folder after checking it (complete, readable, weights
matching their config), and the check of the wan_mini folder trained by vqx.testbed.train; each problem is one
line that says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import UserError, one_line
from ...runtime import from_pretrained_dtype

PIPELINE_CLASSES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}
REQUIRED_PARTS = {
    "t2v": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    "i2v": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder", "image_processor"),
}
WHERE_TO_GET = ("a local diffusers-format folder such as Wan2.1-T2V-1.3B-Diffusers (get it on a machine with "
                "network: huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR, then copy DIR here)")

# wan_mini: train.py publishes the folder in one rename, with ``training.json`` in it, so a folder that has that
# file and every pipeline part is a finished training run.
TRAIN_COMMAND = "python -m vqx.testbed.train --out assets/wan_mini --device cuda"
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
MARKER = "training.json"  # written by train.py; its presence means the run finished
PROMPT_FILES = ("calib/prompts.json", "eval/prompts.json")


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


def load_diffusers_folder(path: Path, task: str, dtype: torch.dtype):
    """The Wan pipeline for ``task`` from a checked folder; transformer in ``dtype``, VAE in fp32."""
    import diffusers
    from diffusers import AutoencoderKLWan

    check_diffusers_folder(path, task)
    cls = getattr(diffusers, PIPELINE_CLASSES[task])
    try:
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", **from_pretrained_dtype(torch.float32),
                                               local_files_only=True)
        return cls.from_pretrained(path, vae=vae, **from_pretrained_dtype(dtype), local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever diffusers raises for a bad folder: one line naming it
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            raise  # not the folder's fault: reported with what to reduce
        raise UserError(f"could not load the pipeline from model.path={path}: {one_line(str(e))[:400]} -- check that "
                        "the folder is a complete copy of a Wan2.1 diffusers model") from None


def missing_parts(folder: Path) -> list[str]:
    """What a complete wan_mini folder has and ``folder`` lacks (empty: complete)."""
    if not folder.is_dir():
        return ["the folder itself"]
    need = ["model_index.json", MARKER, *PROMPT_FILES]
    missing = [n for n in need if not (folder / n).is_file()]
    missing += [f"{p}/" for p in PARTS if not (folder / p).is_dir()]
    return missing


def check_mini_folder(folder: Path) -> None:
    """One line naming what is missing and how to train it."""
    missing = missing_parts(folder)
    if missing:
        raise UserError(f"model=wan_mini needs a trained folder at model.path={folder}, which lacks "
                        f"{', '.join(missing[:3])}; train it with `{TRAIN_COMMAND}` (about 13.5 minutes on one H200; "
                        "--device cpu works but takes hours) or point model.path at a trained copy")
