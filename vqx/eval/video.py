"""``eval=video``: paired generation with the 16-bit and the quantized model, scored per video and frame.

Before quantization the float pipeline generates (or loads from the shared cache) one reference video per
eval prompt and, for the noise floor, a second 16-bit video through a different but equivalent numeric
path. After quantization the quantized pipeline generates from the same seed and settings (the initial
noise comes from a seeded CPU generator, so it is identical), and each pair is scored.

Under torchrun sample i is generated and scored by rank i % world, exactly as one process would (same seed,
same model), and rank 0 gathers the results sample by sample, writes the videos and aggregates.

All videos are scored as 8-bit frames (round(x * 255)), the pixels a PNG or lossless video of the output
holds, as deepcompressor scores saved images; the cache stores exactly those frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .. import distributed
from ..cache import DiskCache
from ..calib.capture import nonfinite_guard
from ..config.schema import SamplerSchema, bounded, choice, register_schema
from ..errors import Fault, UserError
from ..models.adapter import adapter_for
from ..models.fingerprint import model_fingerprint, tensors_fingerprint
from ..models.loading import resolve_device
from ..models.sampling import SamplerSettings, generate
from ..quant.backends import set_backend
from ..quant.formats import get_format
from ..stages import EVALUATORS, Evaluator, RunState
from . import metrics as M
from .lpips_weights import features_state_dict
from .videoio import NO_BACKEND, side_by_side, to_float, to_uint8, video_backend, write_mp4

log = logging.getLogger(__name__)
CACHE_KIND = "eval_video"
CACHE_VERSION = 1  # bump when what an entry holds changes

# Noise-floor methods: a second 16-bit run that should agree with the reference. The reference uses
# diffusers' default attention ("native": torch SDPA picks its kernel); a floor run forces another kernel
# (a different summation order, same math), or TF32 matmuls for float32 models.
SDPA_METHODS = {  # method -> (diffusers attention backend, torch SDPBackend member, kernel name)
    "sdpa_math": ("_native_math", "MATH", "math"),
    "sdpa_flash": ("_native_flash", "FLASH_ATTENTION", "flash"),
    "sdpa_efficient": ("_native_efficient", "EFFICIENT_ATTENTION", "memory-efficient"),
    "sdpa_cudnn": ("_native_cudnn", "CUDNN_ATTENTION", "cuDNN"),
}
NOISE_FLOORS = (*SDPA_METHODS, "tf32")
CUDA_ONLY = ("sdpa_efficient", "sdpa_cudnn", "tf32")
PROBE_TOKENS = 8192  # enough to make SDPA's kernel choice as for the real sequence, small enough to allocate

@dataclass
class VideoEvalSchema(SamplerSchema):
    """Sampler fields (height ... negative_prompt) are inherited with their checks; conf/eval/video.yaml
    defaults them to the model's recommended sampler."""

    name: str = "video"
    backend: str = choice("fake", "kernel")  # fake: dequantized bf16 GEMMs; kernel: int8/fp8 GEMMs as lightx2v runs them
    path: Optional[str] = None  # prompts json; null: assets/wan_<task>/eval/prompts.json
    num_samples: Optional[int] = bounded(None, 1, None)  # the first N prompts; null: all
    lpips_net: str = choice("alex", "vgg")
    noise_floor: str = choice("auto", "none", *NOISE_FLOORS)
    noise_floor_samples: Optional[int] = bounded(None, 1, None)  # null: every sample
    save_videos: bool = True
    fps: int = bounded(16, 1, None)  # Wan2.1 generates 16 fps
    diff_gain: float = bounded(4.0, 0.0, None, exclusive_low=True)  # amplification of the difference panel


register_schema("eval", "video", VideoEvalSchema)


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


def _finite(video: np.ndarray, what: str, index: int, prompt: str) -> np.ndarray:
    if not np.isfinite(video).all():
        raise Fault(f"the {what} produced NaN/Inf pixels for eval sample {index} ({prompt[:50]!r}); "
                    + ("the format or algorithm broke the model" if what == "quantized model" else "the float model itself is broken"))
    return video


@EVALUATORS.register("video")
class VideoEvaluator(Evaluator):
    def check(self) -> None:
        from ..calib.prompts import load_prompt_set

        e, model = self.cfg.eval, self.cfg.model
        self.device = resolve_device(model.device)
        if min(e.height, e.width) < M.LPIPS_MIN_SIDE:
            raise UserError(f"eval.height={e.height} eval.width={e.width}: LPIPS needs at least "
                            f"{M.LPIPS_MIN_SIDE} pixels per side; use eval.height/width >= {M.LPIPS_MIN_SIDE}")
        self.samples = load_prompt_set(e.path, model.task, "eval", limit=e.num_samples)
        fmt = get_format(self.cfg.format.name)
        if e.backend == "kernel" and not (fmt.lightx2v_scheme and fmt.weight == fmt.activation):
            raise UserError(f"eval.backend=kernel needs 8-bit weights and activations (format=w8a8 or fp8), not "
                            f"format={fmt.name}; use eval.backend=fake")
        check_noise_floor(e.noise_floor, self.device)
        self.floor_count = 0 if e.noise_floor == "none" else min(len(self.samples), e.noise_floor_samples or len(self.samples))
        if e.save_videos and video_backend() is None:
            raise UserError(NO_BACKEND + " (or eval.save_videos=false)")
        _, self.lpips_source = features_state_dict(e.lpips_net)  # no weights: fail now, not after generating
        self.images = {}
        self.refs: list[dict | None] = []  # per sample; None for the samples of other torchrun ranks
        self.floors: list[dict | None] = []

    # ---- settings and identities -------------------------------------------------------------------

    def settings(self, sample) -> SamplerSettings:
        base = SamplerSettings.from_config(self.cfg.eval)
        # a sample's own negative prompt (even "") replaces the run's default, as in calibration
        return base if sample.negative_prompt is None else dataclasses.replace(base, negative_prompt=sample.negative_prompt)

    def image(self, i: int):
        if self.cfg.model.task != "i2v":
            return None
        if i not in self.images:
            self.images[i] = self.samples[i].load_image()
        return self.images[i]

    def identity(self, i: int, variant: str) -> dict:
        s = self.samples[i]
        return {**self.base_identity, "prompt": s.prompt, "seed": s.seed, "image": image_digest(self.image(i)),
                "sampler": self.settings(s).as_dict(), "variant": variant}

    # ---- before quantization: 16-bit references (cached) and the noise floor -----------------------

    def prepare_identity(self, pipe: Any) -> None:
        """What every cache key of this run shares: model identity (weights fingerprint), dtype, device
        type, library versions. Per video, `identity` adds prompt, image, seed, sampler and variant."""
        import diffusers

        m = self.cfg.model
        self.cache = DiskCache(self.cfg.cache_dir)
        self.base_identity = {
            "version": CACHE_VERSION,
            "model": {"name": m.name, "task": m.task, "source": m.source, "dtype": m.dtype,
                      "weights": pipeline_fingerprint(m, pipe)},
            "device_type": self.device.type,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
        }

    def before_quantization(self, pipe: Any) -> None:
        self.prepare_identity(pipe)
        self.timings = {"reference_generation_s": 0.0, "noise_floor_generation_s": 0.0}
        mine = set(distributed.shard(len(self.samples)))
        self.refs = [self._cached(pipe, i, "reference", contextlib.nullcontext, "16-bit reference") if i in mine else None
                     for i in range(len(self.samples))]
        e = self.cfg.eval
        settings = SamplerSettings.from_config(e)
        self.floor = None
        if e.noise_floor != "none":
            self.floor = choose_noise_floor(pipe.transformer, settings, self.device) if e.noise_floor == "auto" else e.noise_floor
        self.floor_default = default_sdpa_method(pipe.transformer, settings, self.device)
        self.floors = [self._cached(pipe, i, f"noise_floor/{self.floor}", lambda: noise_floor_context(self.floor),
                                    "noise floor") if i in mine else None for i in range(self.floor_count)]
        hits = sum(r["cache_hit"] for r in self._entries())
        log.info("eval: %d reference and %d noise-floor videos (%d from the cache %s)", sum(map(bool, self.refs)),
                 sum(map(bool, self.floors)), hits, self.cache.root)

    def _entries(self) -> list[dict]:
        """This rank's reference and noise-floor cache entries."""
        return [r for r in self.refs + self.floors if r is not None]

    def _cached(self, pipe, i: int, variant: str, context, desc: str) -> dict:
        s = self.samples[i]

        def build(tmp: Path) -> None:
            t0 = time.perf_counter()
            with context():
                video = self._generate(pipe, i, f"{desc} {i + 1}/{len(self.samples)}")
            _finite(video, "16-bit model", i, s.prompt)
            np.save(tmp / "video.npy", to_uint8(video))
            key = "reference_generation_s" if variant == "reference" else "noise_floor_generation_s"
            self.timings[key] += time.perf_counter() - t0

        path, hit = self.cache.get_or_build(CACHE_KIND, self.identity(i, variant), build, lambda d: d / "video.npy")
        return {"path": path, "cache_hit": hit}

    def _generate(self, pipe, i: int, desc: str) -> np.ndarray:
        s = self.samples[i]
        settings = self.settings(s)
        done = [0]  # denoising steps finished: the step a NaN appears in is named in the error

        def on_step(k, n):
            done[0] = k + 1
            bar.update(1)

        quantized = desc.startswith("quantized")
        where = lambda: f"while generating eval sample {i} ({desc.rsplit(' ', 1)[0]} model) at denoising step {done[0]}"  # noqa: E731
        fix = ("the format or algorithm breaks this layer: try another algorithm/format or format.skip_patterns for it"
               if quantized else "the float model itself overflows: try model.dtype=float32 or check the checkpoint")
        with tqdm(total=settings.steps, desc=desc, unit="step", leave=False, disable=None) as bar, \
                nonfinite_guard(pipe.transformer, where, fix):
            return generate(pipe, s.prompt, settings, s.seed, image=self.image(i), on_step=on_step)

    # ---- after quantization: generate, score, write -----------------------------------------------

    def _score(self, pipe, i: int) -> tuple[dict, dict | None, tuple | None]:
        """Generate sample i with the quantized model and score it: (entry, noise-floor scores, (reference,
        quantized) frames for the video files or None), with the time spent generating and scoring."""
        e, s, dev = self.cfg.eval, self.samples[i], str(self.device)
        t0 = time.perf_counter()
        quant = to_uint8(_finite(self._generate(pipe, i, f"quantized {i + 1}/{len(self.samples)}"), "quantized model",
                                 i, s.prompt))
        self.timings["quantized_generation_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = np.load(self.refs[i]["path"])
        entry = {"index": i, "prompt": s.prompt, "seed": s.seed, "image": s.image_path,
                 **M.video_summary(M.frame_metrics(to_float(ref), to_float(quant), e.lpips_net, dev)),
                 "reference_cache_hit": self.refs[i]["cache_hit"]}
        floor = None
        if i < self.floor_count:
            fl = np.load(self.floors[i]["path"])
            floor = M.video_summary(M.frame_metrics(to_float(ref), to_float(fl), e.lpips_net, dev))
            floor["identical"] = bool(np.array_equal(ref, fl))
            entry["noise_floor"] = {k: floor[k] for k in ("lpips", "psnr", "ssim")}
        self.timings["scoring_s"] += time.perf_counter() - t0
        log.info("eval sample %d: LPIPS %.4f  PSNR %.2f dB  SSIM %.4f%s", i, entry["lpips"], entry["psnr"], entry["ssim"],
                 f"  (noise floor LPIPS {entry['noise_floor']['lpips']:.4f})" if "noise_floor" in entry else "")
        return entry, floor, ((ref, quant) if e.save_videos else None)

    def _write_videos(self, i: int, ref: np.ndarray, quant: np.ndarray) -> dict:
        e, stem = self.cfg.eval, f"{i:03d}"
        files = {"reference": f"videos/{stem}_reference.mp4", "quantized": f"videos/{stem}_quantized.mp4",
                 "side_by_side": f"videos/{stem}_side_by_side.mp4"}
        write_mp4(self.run_dir / files["reference"], ref, e.fps)
        write_mp4(self.run_dir / files["quantized"], quant, e.fps)
        write_mp4(self.run_dir / files["side_by_side"], side_by_side(ref, quant, e.diff_gain), e.fps)
        return files

    def evaluate(self, state: RunState) -> dict:
        e = self.cfg.eval
        set_backend(state.pipe.transformer, e.backend)
        self.timings.update(quantized_generation_s=0.0, scoring_s=0.0)
        videos, floors = [], []
        n, world = len(self.samples), distributed.world_size()
        # One round per `world` samples, one sample per rank; rank 0 takes the round's results and writes them,
        # so it never holds more than one round of videos.
        for start in tqdm(range(0, n, world), desc="quantized videos", unit="round" if world > 1 else "video",
                          disable=None):
            i = start + distributed.rank()
            results = distributed.gather_object(self._score(state.pipe, i) if i < n else None)
            for entry, floor, frames in [r for r in results or [] if r is not None]:
                if frames is not None:
                    entry["files"] = self._write_videos(entry["index"], *frames)
                if floor is not None:
                    floors.append(floor)
                videos.append(entry)
        cache_use = distributed.gather_object([r["cache_hit"] for r in self._entries()])
        if not distributed.is_main():
            return {}
        cache_use = [hit for rank in cache_use for hit in rank]

        out = M.aggregate(videos)
        out["noise_floor"] = self._floor_summary(floors)
        plot = None
        if e.save_videos:
            from .plot import plot_per_frame

            plot = "per_frame.png"
            plot_per_frame(self.run_dir / plot, videos, floors,
                           f"{self.cfg.model.name} {state.format.name} {self.cfg.algorithm.name}: quantized vs 16-bit")
        out["eval"] = {
            "evaluator": "video",
            "samples": len(videos),
            "prompts": e.path or f"assets/wan_{self.cfg.model.task}/eval/prompts.json",
            "sampler": SamplerSettings.from_config(e).as_dict(),
            "lpips_net": e.lpips_net,
            "lpips_weights": self.lpips_source,
            "psnr_cap_db": M.PSNR_CAP_DB,
            "pixels": "8-bit frames (round(x*255)); PSNR on [0,1] averaged over frames, each frame capped at "
                      f"{M.PSNR_CAP_DB:g} dB; LPIPS v0.1 on [-1,1]; SSIM torchmetrics (11x11 Gaussian, sigma 1.5)",
            "std": "population std over videos",
            "reference_cache": {"dir": str(self.cache.root), "hits": sum(cache_use),
                                "built": len(cache_use) - sum(cache_use)},
            "video_backend": video_backend() if e.save_videos else None,
            "plot": plot,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},  # under torchrun: rank 0's own
        }
        out["videos"] = videos
        return out

    def _floor_summary(self, floors: list[dict]) -> dict:
        if self.floor is None:
            return {"method": "none", "description": "disabled (eval.noise_floor=none)", "samples": 0}
        summary = {k: v for k, v in M.aggregate(floors).items() if k != "per_frame"}
        identical = sum(f["identical"] for f in floors)
        if identical:
            log.warning("eval: the noise-floor run (%s) reproduced %d of %d references bit for bit; "
                        "this floor understates the run-to-run difference", self.floor, identical, len(floors))
        return {**summary, "method": self.floor, "description": describe_noise_floor(self.floor, self.floor_default),
                "samples": len(floors), "identical_videos": identical}
