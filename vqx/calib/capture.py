"""Capture: run the pipeline's real sampling loop on calibration prompts and record the transformer's
inputs at chosen denoising steps, both classifier-free-guidance branches.

What is stored is small (noisy latents, timestep, text/image embeddings per call, the embeddings
deduplicated per prompt and branch), so the capture is cached on disk and shared by runs and sweep
points; the block inputs are recomputed from it (`blocks.first_block_inputs`).

Under torchrun each rank records, and later streams statistics over, the calls of its own prompts
(prompt p on rank p % world); the cache entry holds all of them in the single-process order.
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

from .. import distributed
from ..cache import DiskCache, file_sha256
from ..diagnostics import first_nonfinite_layer, nonfinite_guard  # noqa: F401  (runner imports first_nonfinite_layer from here)
from ..errors import Fault, storage_error
from ..models.adapter import adapter_for
from ..models.sampling import SamplerSettings, generate
from ..prompts import PromptSample, load_prompt_set

log = logging.getLogger(__name__)
CAPTURE_VERSION = 1
META_KEYS = ("prompt", "step", "branch")  # per call, besides the names of its tensors


@dataclass
class Capture:
    calls: list[dict[str, torch.Tensor]]  # transformer kwargs per recorded call
    meta: list[dict]  # per call: prompt index, step, branch ("cond"/"uncond")
    cache_hit: bool = False
    # Under torchrun a rank holds its prompts' calls only: their positions in the whole capture, and its size.
    indices: list[int] | None = None
    total_calls: int | None = None
    identity: dict | None = None  # the cache identity it was captured under (keys what is derived from it)

    def __post_init__(self):
        if self.indices is None:
            self.indices = list(range(len(self.calls)))
        if self.total_calls is None:
            self.total_calls = len(self.calls)

    def share(self, rank: int, world: int) -> "Capture":
        """The calls of prompts p with p % world == rank (this capture must be the whole one)."""
        keep = [k for k, m in enumerate(self.meta) if m["prompt"] % world == rank]
        return Capture([self.calls[k] for k in keep], [self.meta[k] for k in keep], self.cache_hit, keep, len(self.calls))


def capture_step_indices(total_steps: int, capture_steps: int | None, window=(0.0, 1.0)) -> list[int]:
    """``capture_steps`` indices evenly spaced over the window of the trajectory (``calib.capture_window``:
    fractions of it, [0, 1] the whole), its first and last step included."""
    first, last = round(window[0] * (total_steps - 1)), round(window[1] * (total_steps - 1))
    span = last - first + 1
    if capture_steps is None or capture_steps >= span:
        return list(range(first, last + 1))
    if capture_steps == 1:
        return [first]
    return sorted({first + round(i * (span - 1) / (capture_steps - 1)) for i in range(capture_steps)})


def sampler_settings(calib: DictConfig) -> SamplerSettings:
    return SamplerSettings(calib.height, calib.width, calib.num_frames, calib.steps, calib.guidance,
                           calib.shift, calib.negative_prompt)


@torch.no_grad()
def record_calls(pipe, samples: list[PromptSample], settings: SamplerSettings, steps: list[int],
                 prompt_ids: list[int] | None = None) -> Capture:
    """``prompt_ids``: the samples' indices in the whole prompt set (a rank records a share of it)."""
    wanted = set(steps)
    keys = adapter_for(pipe).capture_keys
    prompt_ids = list(range(len(samples))) if prompt_ids is None else prompt_ids
    calls, meta = [], []
    state = {"step": 0, "in_step": 0, "prompt": 0}

    def hook(module, args, kwargs):
        if state["step"] in wanted:
            call = {k: kwargs[k].detach().cpu().clone() for k in keys if kwargs.get(k) is not None}
            if not all(torch.isfinite(v).all() for v in call.values() if v.is_floating_point()):
                raise Fault(f"non-finite transformer inputs while capturing prompt {state['prompt']} at step "
                            f"{state['step']}: the float model itself produces NaN/Inf (check model.dtype and weights)")
            calls.append(call)
            meta.append({"prompt": state["prompt"], "step": state["step"],
                         "branch": "cond" if state["in_step"] == 0 else "uncond"})
        state["in_step"] += 1

    def on_step(i, total):
        state["step"], state["in_step"] = i + 1, 0

    # in_step counts calls begun in this step (the pre-hook ran), so 1 is the cond branch, 2 uncond
    where = lambda: (f"in the float model while capturing calibration prompt {state['prompt']} at denoising step "  # noqa: E731
                     f"{state['step']} ({'cond' if state['in_step'] <= 1 else 'uncond'} branch)")
    fix = "the weights overflow in this dtype: try model.dtype=float32, or check the checkpoint (a huge or NaN weight)"
    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with nonfinite_guard(pipe.transformer, where, fix):
            t0 = time.perf_counter()
            for n, (p, sample) in enumerate(zip(prompt_ids, tqdm(samples, desc="calibration capture", unit="prompt"))):
                state.update(step=0, in_step=0, prompt=p)
                image = sample.load_image() if sample.image_path else None
                sampler = settings if sample.negative_prompt is None else replace(settings, negative_prompt=sample.negative_prompt)
                generate(pipe, sample.prompt, sampler, sample.seed, image=image, on_step=on_step, output_type="latent")
                log.info("captured prompt %d/%d (%.1f s elapsed)", n + 1, len(samples), time.perf_counter() - t0)
    finally:
        handle.remove()
    return Capture(calls, meta)


def _save(capture: Capture, folder: Path, prompt_keys: tuple[str, ...]) -> None:
    """``prompt_keys``: the call arguments that are the same at every step of a prompt's branch (stored once)."""
    tensors, shared, meta = {}, {}, []
    for i, (call, m) in enumerate(zip(capture.calls, capture.meta)):
        entry = dict(m)
        for key, t in call.items():
            if key in prompt_keys:
                name = f"{key}.{m['prompt']}.{m['branch']}"
                shared.setdefault(name, t.contiguous())
                entry[key] = name
            else:
                name = f"{i}.{key}"
                tensors[name] = t.contiguous()
                entry[key] = name
        meta.append(entry)
    try:
        save_file({**tensors, **shared}, str(folder / "calls.safetensors"))
    except Exception as e:  # noqa: BLE001 -- safetensors reports a full disk as its own error type
        raise (storage_error(e, folder / "calls.safetensors") or e) from None
    (folder / "meta.json").write_text(json.dumps(meta))


def _load(folder: Path) -> Capture:
    tensors = load_file(str(folder / "calls.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    calls = [{k: tensors[name] for k, name in m.items() if k not in META_KEYS} for m in meta]
    return Capture(calls, [{k: m[k] for k in META_KEYS} for m in meta])


def prompts_identity(samples: list[PromptSample]) -> list:
    return [[s.prompt, s.seed, s.negative_prompt, file_sha256(Path(s.image_path)) if s.image_path else None]
            for s in samples]


def load_or_capture(pipe, calib: DictConfig, task: str, model_identity: dict, cache: DiskCache) -> Capture:
    """The capture for these settings, from the cache or freshly recorded (then cached)."""
    samples = load_prompt_set(calib.path, task, "calib", limit=calib.num_prompts)
    settings = sampler_settings(calib)
    steps = capture_step_indices(settings.steps, calib.capture_steps, tuple(calib.get("capture_window", (0.0, 1.0))))
    prompt_keys = adapter_for(pipe).prompt_keys
    identity = {
        "version": CAPTURE_VERSION,
        "model": model_identity,
        "prompts": prompts_identity(samples),
        "sampler": settings.as_dict(),
        "capture_steps": steps,
        "device": pipe.device.type,
    }
    if distributed.is_distributed():
        capture, hit = _load_or_capture_share(pipe, samples, settings, steps, identity, cache, prompt_keys)
    else:
        capture, hit = cache.get_or_build(
            "calib_capture", identity,
            lambda folder: _save(record_calls(pipe, samples, settings, steps), folder, prompt_keys), _load)
    capture.cache_hit = hit
    capture.identity = identity
    log.info("calibration capture: %d transformer calls (%d prompts x %d steps x CFG branches)%s%s",
             capture.total_calls, len(samples), len(steps), " [cache hit]" if hit else "",
             f", {len(capture.calls)} of them on this rank" if distributed.is_distributed() else "")
    return capture


def _load_or_capture_share(pipe, samples, settings, steps, identity, cache: DiskCache,
                           prompt_keys: tuple[str, ...]) -> tuple[Capture, bool]:
    """Under torchrun: this rank's share of the capture. Rank 0 owns the cache entry: on a miss every rank
    records its prompts and rank 0 saves their union in the single-process order (bit for bit the entry a
    single process writes); on a hit rank 0 hands each rank its share."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = distributed.shard(len(samples))
    holder = {}

    def record_share() -> Capture:
        holder["mine"] = record_calls(pipe, [samples[p] for p in mine], settings, steps, prompt_ids=mine)
        return holder["mine"]

    def build(folder: Path) -> None:
        distributed.broadcast_object("record")  # a miss: the other ranks record their prompts too
        parts = distributed.gather_object(record_share())
        order = sorted(((m["prompt"], r, k) for r, part in enumerate(parts) for k, m in enumerate(part.meta)))
        _save(Capture([parts[r].calls[k] for _, r, k in order], [parts[r].meta[k] for _, r, k in order]), folder,
              prompt_keys)

    if rank == 0:
        whole, hit = cache.get_or_build("calib_capture", identity, build, _load)
        if hit:
            distributed.broadcast_object("hit")
        meta = distributed.broadcast_object(whole.meta)
    else:
        hit = distributed.broadcast_object(None) == "hit"
        if not hit:
            distributed.gather_object(record_share())
        meta, whole = distributed.broadcast_object(None), None
    if hit:  # rank 0 read the entry: hand out the shares (the cache_dir need not be visible to every node)
        return distributed.scatter_object([whole.share(r, world) for r in range(world)] if rank == 0 else None), True
    share = holder["mine"]  # recorded here, in the order of the whole capture
    share.indices = [k for k, m in enumerate(meta) if m["prompt"] % world == rank]
    share.total_calls = len(meta)
    return share, False
