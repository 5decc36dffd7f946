"""``eval=video``'s settings, registered without importing torch so a bad value is refused before the heavy imports;
the evaluator is `video.py`, the noise floor's kernels `noise_floor.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config.schema import SamplerSchema, bounded, choice, register_schema, renamed

SDPA_METHODS = {  # noise floor method -> (diffusers attention backend, torch SDPBackend member, kernel name)
    "sdpa_math": ("_native_math", "MATH", "math"),
    "sdpa_flash": ("_native_flash", "FLASH_ATTENTION", "flash"),
    "sdpa_efficient": ("_native_efficient", "EFFICIENT_ATTENTION", "memory-efficient"),
    "sdpa_cudnn": ("_native_cudnn", "CUDNN_ATTENTION", "cuDNN"),
}
NOISE_FLOORS = (*SDPA_METHODS, "tf32")


@dataclass
class VideoEvalSchema(SamplerSchema):
    """Sampler fields (height ... negative_prompt) are inherited with their checks; conf/eval/video.yaml
    defaults them to the model's recommended sampler."""

    name: str = "video"
    # how quantized linears multiply: fake (quantize-dequantize, then a GEMM in the model dtype) or kernel
    # (int8/fp8 GEMMs as lightx2v runs them); `vqx.quant.backends.set_backend` applies it
    gemm: str = choice("fake", "kernel")
    backend: Optional[str] = renamed("gemm")  # deprecated: eval.gemm's old name
    path: Optional[str] = None  # prompts json; null: assets/wan_<task>/eval/prompts.json
    num_samples: Optional[int] = bounded(None, 1, None)  # the first N prompts; null: all
    lpips_net: str = choice("alex", "vgg")
    noise_floor: str = choice("auto", "none", *NOISE_FLOORS)
    noise_floor_samples: Optional[int] = bounded(None, 1, None)  # null: every sample
    save_videos: bool = True
    fps: int = bounded(16, 1, None)  # Wan2.1 generates 16 fps
    diff_gain: float = bounded(4.0, 0.0, None, exclusive_low=True)  # amplification of the difference panel


register_schema("eval", "video", VideoEvalSchema)
