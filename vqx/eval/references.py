"""The shared cache of 16-bit videos (references and noise-floor runs) under ``cache_dir/eval_video/``.

An entry is one video's 8-bit frames, keyed by everything that determines them: the model (name, task, source,
dtype, weights fingerprint), the device type, torch/diffusers versions, and per video the prompt, image, seed,
sampler settings and variant ("reference" or "noise_floor/<method>"). A sweep generates them once; concurrent
jobs build each entry once (see `vqx.cache`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig

from ..cache import DiskCache
from ..models.fingerprint import model_fingerprint, tensors_fingerprint
from ..models.sampling import SamplerSettings
from ..prompts import PromptSample

CACHE_KIND = "eval_video"
CACHE_VERSION = 1  # bump when what an entry holds changes


def pipeline_fingerprint(model_cfg: DictConfig, pipe: Any) -> str:
    """Every weight that shapes a video: a diffusers folder's files, or a tiny pipeline's tensors."""
    if model_cfg.source in ("diffusers", "synthetic"):
        return model_fingerprint(model_cfg, pipe.transformer)
    h = hashlib.sha256()
    for name, part in sorted(pipe.components.items()):
        if isinstance(part, torch.nn.Module):
            h.update(f"{name}:{tensors_fingerprint(part)}".encode())
    return h.hexdigest()


def image_digest(image) -> str | None:
    if image is None:
        return None
    return hashlib.sha256(f"{image.mode}|{image.size}|".encode() + image.tobytes()).hexdigest()


class ReferenceCache:
    """16-bit videos of one model on one device type, as uint8 frames in ``video.npy`` cache entries."""

    def __init__(self, cache_dir: str, model_cfg: DictConfig, pipe: Any, device: torch.device):
        import diffusers

        m = model_cfg
        self.cache = DiskCache(cache_dir)
        # what every key of this run shares; `identity` adds the video's own settings
        self.base_identity = {
            "version": CACHE_VERSION,
            "model": {"name": m.name, "task": m.task, "source": m.source, "dtype": m.dtype,
                      "weights": pipeline_fingerprint(m, pipe)},
            "device_type": device.type,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
        }

    @property
    def root(self) -> Path:
        return self.cache.root

    def identity(self, sample: PromptSample, settings: SamplerSettings, image, variant: str) -> dict:
        return {**self.base_identity, "prompt": sample.prompt, "seed": sample.seed, "image": image_digest(image),
                "sampler": settings.as_dict(), "variant": variant}

    def entry_dir(self, identity: dict) -> Path:
        return self.cache.entry_dir(CACHE_KIND, identity)

    def get(self, identity: dict, make: Callable[[], np.ndarray]) -> dict:
        """{"path": the entry's ``video.npy``, "cache_hit"}; ``make()`` returns the uint8 frames on a miss."""
        def build(tmp: Path) -> None:
            np.save(tmp / "video.npy", make())

        path, hit = self.cache.get_or_build(CACHE_KIND, identity, build, lambda d: d / "video.npy")
        return {"path": path, "cache_hit": hit}
