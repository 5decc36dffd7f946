"""Running a Wan pipeline's real sampling loop with explicit sampler settings and seeded noise.

Calibration capture and evaluation both sample through `generate`, so they use the same sampler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig


@dataclass(frozen=True)
class SamplerSettings:
    height: int
    width: int
    num_frames: int
    steps: int
    guidance: float
    shift: float
    negative_prompt: str = ""

    @classmethod
    def from_config(cls, node: DictConfig) -> "SamplerSettings":
        return cls(**{k: node[k] for k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return asdict(self)


def set_flow_shift(pipe, shift: float) -> None:
    """Use the pipeline's own scheduler class with the given flow-matching shift."""
    sched = pipe.scheduler
    key = "flow_shift" if "flow_shift" in sched.config else "shift"
    if sched.config.get(key) != shift:
        pipe.scheduler = type(sched).from_config(sched.config, **{key: shift})


@torch.no_grad()
def generate(pipe, prompt: str, settings: SamplerSettings, seed: int, image: Any = None,
             on_step: Callable[[int, int], None] | None = None, output_type: str = "np") -> np.ndarray:
    """One video as float32 [frames, H, W, 3] in [0, 1] (``output_type="np"``) or latents ("latent").

    The initial noise comes from a CPU generator seeded with ``seed``, so it is the same on every device
    and for the reference and the quantized model.
    """
    set_flow_shift(pipe, settings.shift)
    kwargs = dict(
        prompt=prompt,
        negative_prompt=settings.negative_prompt or None,
        height=settings.height,
        width=settings.width,
        num_frames=settings.num_frames,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type=output_type,
    )
    if image is not None:
        kwargs["image"] = image
    if on_step is not None:
        kwargs["callback_on_step_end"] = lambda p, i, t, tensors: (on_step(i, settings.steps), tensors)[1]
    frames = pipe(**kwargs).frames
    if output_type == "latent":
        return frames
    return np.asarray(frames[0], dtype=np.float32)
