"""Capture: run the pipeline's real sampling loop on calibration prompts and record the transformer's
inputs at chosen denoising steps, both classifier-free-guidance branches.

What is stored is small (noisy latents, timestep, text/image embeddings per call, the embeddings
deduplicated per prompt and branch), so the capture is cached on disk and shared by runs and sweep
points; the block inputs are recomputed from it (`blocks.first_block_inputs`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..cache import DiskCache, file_sha256
from ..errors import Fault
from ..models.sampling import SamplerSettings, generate
from .prompts import PromptSample, load_prompt_set

log = logging.getLogger(__name__)
CAPTURE_VERSION = 1
CALL_KEYS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")


@dataclass
class Capture:
    calls: list[dict[str, torch.Tensor]]  # transformer kwargs per recorded call
    meta: list[dict]  # per call: prompt index, step, branch ("cond"/"uncond")
    cache_hit: bool = False


def capture_step_indices(total_steps: int, capture_steps: int | None) -> list[int]:
    """``capture_steps`` indices evenly spaced over the whole trajectory, first and last included."""
    if capture_steps is None or capture_steps >= total_steps:
        return list(range(total_steps))
    if capture_steps == 1:
        return [0]
    return sorted({round(i * (total_steps - 1) / (capture_steps - 1)) for i in range(capture_steps)})


def sampler_settings(calib: DictConfig) -> SamplerSettings:
    return SamplerSettings(calib.height, calib.width, calib.num_frames, calib.steps, calib.guidance,
                           calib.shift, calib.negative_prompt)


@torch.no_grad()
def record_calls(pipe, samples: list[PromptSample], settings: SamplerSettings, steps: list[int]) -> Capture:
    wanted = set(steps)
    calls, meta = [], []
    state = {"step": 0, "in_step": 0, "prompt": 0}

    def hook(module, args, kwargs):
        if state["step"] in wanted:
            call = {k: kwargs[k].detach().cpu().clone() for k in CALL_KEYS if kwargs.get(k) is not None}
            if not all(torch.isfinite(v).all() for v in call.values() if v.is_floating_point()):
                raise Fault(f"non-finite transformer inputs while capturing prompt {state['prompt']} at step "
                            f"{state['step']}: the float model itself produces NaN/Inf (check model.dtype and weights)")
            calls.append(call)
            meta.append({"prompt": state["prompt"], "step": state["step"],
                         "branch": "cond" if state["in_step"] == 0 else "uncond"})
        state["in_step"] += 1

    def on_step(i, total):
        state["step"], state["in_step"] = i + 1, 0

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        t0 = time.perf_counter()
        for p, sample in enumerate(tqdm(samples, desc="calibration capture", unit="prompt")):
            state.update(step=0, in_step=0, prompt=p)
            image = sample.load_image() if sample.image_path else None
            sampler = settings if sample.negative_prompt is None else replace(settings, negative_prompt=sample.negative_prompt)
            generate(pipe, sample.prompt, sampler, sample.seed, image=image, on_step=on_step, output_type="latent")
            log.info("captured prompt %d/%d (%.1f s elapsed)", p + 1, len(samples), time.perf_counter() - t0)
    finally:
        handle.remove()
    return Capture(calls, meta)


def _save(capture: Capture, folder: Path) -> None:
    tensors, shared, meta = {}, {}, []
    for i, (call, m) in enumerate(zip(capture.calls, capture.meta)):
        entry = dict(m)
        for key, t in call.items():
            if key in ("encoder_hidden_states", "encoder_hidden_states_image"):
                # identical for every step of a prompt's branch: store once
                name = f"{key}.{m['prompt']}.{m['branch']}"
                shared.setdefault(name, t.contiguous())
                entry[key] = name
            else:
                name = f"{i}.{key}"
                tensors[name] = t.contiguous()
                entry[key] = name
        meta.append(entry)
    save_file({**tensors, **shared}, str(folder / "calls.safetensors"))
    (folder / "meta.json").write_text(json.dumps(meta))


def _load(folder: Path) -> Capture:
    tensors = load_file(str(folder / "calls.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    calls = [{k: tensors[m[k]] for k in CALL_KEYS if k in m} for m in meta]
    return Capture(calls, [{k: m[k] for k in ("prompt", "step", "branch")} for m in meta])


def prompts_identity(samples: list[PromptSample]) -> list:
    return [[s.prompt, s.seed, s.negative_prompt, file_sha256(Path(s.image_path)) if s.image_path else None]
            for s in samples]


def load_or_capture(pipe, calib: DictConfig, task: str, model_identity: dict, cache: DiskCache) -> Capture:
    """The capture for these settings, from the cache or freshly recorded (then cached)."""
    samples = load_prompt_set(calib.path, task, "calib", limit=calib.num_prompts)
    settings = sampler_settings(calib)
    steps = capture_step_indices(settings.steps, calib.capture_steps)
    identity = {
        "version": CAPTURE_VERSION,
        "model": model_identity,
        "prompts": prompts_identity(samples),
        "sampler": settings.as_dict(),
        "capture_steps": steps,
        "device": pipe.device.type,
    }
    holder = {}

    def build(folder: Path) -> None:
        holder["capture"] = record_calls(pipe, samples, settings, steps)
        _save(holder["capture"], folder)

    capture, hit = cache.get_or_build("calib_capture", identity, build, _load)
    capture.cache_hit = hit
    log.info("calibration capture: %d transformer calls (%d prompts x %d steps x CFG branches)%s",
             len(capture.calls), len(samples), len(steps), " [cache hit]" if hit else "")
    return capture
