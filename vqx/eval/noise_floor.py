"""The noise floor: a second 16-bit run that should agree with the reference, scored against it, so that a real
quantization loss can be told from run-to-run numerics (``eval.noise_floor``).

The reference uses diffusers' default attention ("native": torch SDPA picks its kernel); a floor run forces
another kernel (a different summation order, same math), or TF32 matmuls for float32 models.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..errors import UserError
from ..models.sampling import SamplerSettings
from ..models.adapter import adapter_for
from . import metrics as M
from .schemas import SDPA_METHODS

log = logging.getLogger(__name__)

CUDA_ONLY = ("sdpa_efficient", "sdpa_cudnn", "tf32")
PROBE_TOKENS = 8192  # enough to make SDPA's kernel choice as for the real sequence, small enough to allocate


def check_noise_floor(method: str, device: torch.device) -> None:
    if method in CUDA_ONLY and device.type != "cuda":
        raise UserError(f"eval.noise_floor={method} needs a CUDA device; on {device.type} use eval.noise_floor=auto "
                        "(or sdpa_math / sdpa_flash)")


def _attention_probe(transformer, settings: SamplerSettings, device: torch.device) -> torch.Tensor:
    """A self-attention query shaped like the model's (heads, head dim, dtype, layout as diffusers passes it)."""
    adapter = adapter_for(transformer)
    tokens = adapter.video_tokens(transformer, settings.height, settings.width, settings.num_frames)
    heads, head_dim = adapter.attention_heads(transformer)
    dtype = adapter.block_dtype(transformer)
    q = torch.zeros(1, min(tokens, PROBE_TOKENS), heads, head_dim, device=device, dtype=dtype)
    return q.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D], as diffusers' native backend calls SDPA


def _kernel_runs(method: str, q: torch.Tensor) -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(getattr(SDPBackend, SDPA_METHODS[method][1])):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:  # this kernel does not support these inputs here
        return False


def default_sdpa_method(transformer, settings: SamplerSettings, device: torch.device) -> str | None:
    """The SDPA kernel the reference's attention runs (as an ``sdpa_*`` method name)."""
    q = _attention_probe(transformer, settings, device)
    chosen = torch._fused_sdp_choice(q, q, q)  # what F.scaled_dot_product_attention dispatches to
    return next((m for m, (_, enum, _) in SDPA_METHODS.items()
                 if int(getattr(torch.nn.attention.SDPBackend, enum)) == chosen), None)


def choose_noise_floor(transformer, settings: SamplerSettings, device: torch.device) -> str:
    """The first attention kernel that runs the model's shapes and is not the default one (which would
    reproduce the reference bit for bit); TF32 for float32 models on GPU where no other kernel runs."""
    default = default_sdpa_method(transformer, settings, device)
    small = _attention_probe(transformer, settings, device)[:, :, :64]
    candidates = ("sdpa_efficient", "sdpa_flash", "sdpa_cudnn") if device.type == "cuda" else ("sdpa_math", "sdpa_flash")
    for method in candidates:
        if method != default and _kernel_runs(method, small):
            return method
    if device.type == "cuda" and small.dtype == torch.float32:
        return "tf32"
    return "sdpa_math"  # last resort (math materializes the attention matrix)


def describe_noise_floor(method: str, default: str | None) -> str:
    if method == "tf32":
        return ("fp32 matmuls and convolutions in TF32 (torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 "
                "on) vs full fp32; same weights and noise")
    backend, _, kernel = SDPA_METHODS[method]
    ref = f"SDPA's default choice, here its {SDPA_METHODS[default][2]} kernel" if default else "SDPA's default choice"
    return (f"transformer attention through torch SDPA's {kernel} kernel (diffusers attention backend {backend}) "
            f"vs the reference's {ref}; same weights, dtype and noise")


@contextlib.contextmanager
def noise_floor_context(method: str):
    if method in SDPA_METHODS:
        from diffusers.models.attention_dispatch import attention_backend

        with attention_backend(SDPA_METHODS[method][0]):
            yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def attention_kernels(method: str | None, default: str | None, runtime) -> dict:
    """Which attention each side of the comparison ran: the reference and the floor are both 16-bit (a quantized
    attention is installed after them), the quantized videos may not be (``runtime``: the run's
    vqx.quant.attention_plan.AttentionRuntime or None)."""
    sdpa = f"16-bit, torch SDPA ({SDPA_METHODS[default][2]} kernel)" if default else "16-bit, torch SDPA"
    floor = (None if method is None else sdpa + " in TF32" if method == "tf32"
             else f"16-bit, torch SDPA ({SDPA_METHODS[method][2]} kernel)")
    if runtime is None:
        quantized = sdpa
    else:
        plan = runtime.plan
        steps = f", 16-bit at steps {list(plan.full_precision_steps)}" if plan.full_precision_steps else ""
        quantized = f"attention={plan.scheme.name} emulated (vqx.quant.attention) at {', '.join(plan.sites)}{steps}"
    return {"reference": sdpa, "noise_floor": floor, "quantized": quantized}


def floor_summary(method: str | None, default: str | None, floors: list[dict]) -> dict:
    """metrics.json's ``noise_floor``: the floor videos' scores against their references, aggregated."""
    if method is None:
        return {"method": "none", "description": "disabled (eval.noise_floor=none)", "samples": 0}
    summary = {k: v for k, v in M.aggregate(floors).items() if k != "per_frame"}
    identical = sum(f["identical"] for f in floors)
    if identical:
        log.warning("eval: the noise-floor run (%s) reproduced %d of %d references bit for bit; "
                    "this floor understates the run-to-run difference", method, identical, len(floors))
    return {**summary, "method": method, "description": describe_noise_floor(method, default),
            "samples": len(floors), "identical_videos": identical}


def resolve_noise_floor(setting: str, transformer, settings: SamplerSettings,
                        device: torch.device) -> tuple[str | None, str | None]:
    """(the floor method ``eval.noise_floor=setting`` means here, None when off; the reference's SDPA method)."""
    method = None
    if setting != "none":
        method = choose_noise_floor(transformer, settings, device) if setting == "auto" else setting
    return method, default_sdpa_method(transformer, settings, device)
