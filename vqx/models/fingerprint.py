"""Fingerprints that identify a model's weights in cache keys (cheap, but change when weights change)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..config.schema import OutlierSchema


def tensors_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes and bytes). Fine for small models."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def folder_fingerprint(folder: Path, edge_bytes: int = 1 << 20) -> str:
    """For checkpoints too large to hash whole: each weight/config file's name, size, header and tail."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix not in (".safetensors", ".json", ".bin", ".pth"):
            continue
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder)}|{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(edge_bytes))
            if size > 2 * edge_bytes:
                f.seek(size - edge_bytes)
                h.update(f.read(edge_bytes))
    return h.hexdigest()


def model_fingerprint(model_cfg: DictConfig, transformer: torch.nn.Module) -> str:
    """Identity of the transformer weights as loaded (tiny: full tensor hash; folders: file fingerprint; plus
    the injected outliers, which change the weights, not the files)."""
    if model_cfg.source in ("diffusers", "mini"):
        base = folder_fingerprint(Path(model_cfg.path).expanduser())
    elif model_cfg.source == "synthetic":
        base = synthetic_fingerprint(model_cfg, transformer)
    else:
        return tensors_fingerprint(transformer)
    o = model_cfg.get("outliers")
    if not (o and o.channels):
        return base
    key = f"{base}|outliers|{o.channels}|{float(o.scale)}|{o.seed}"
    sites = list(o.get("sites") or [])
    if sites != OutlierSchema().sites:  # the default sites keep the keys they always had
        key += f"|{','.join(sites)}"
    return hashlib.sha256(key.encode()).hexdigest()


def synthetic_fingerprint(model_cfg: DictConfig, transformer: torch.nn.Module) -> str:
    """Random full-size weights are fixed by their recipe: hashing gigabytes would dominate a benchmark."""
    p = next(transformer.parameters())
    recipe = (f"synthetic|{model_cfg.arch}|{model_cfg.num_layers}|{model_cfg.seed}|{model_cfg.dtype}|"
              f"{p.device.type}|{torch.__version__}")
    return hashlib.sha256(recipe.encode()).hexdigest()
