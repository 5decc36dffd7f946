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
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import distributed
from ..errors import UserError
from ..models.sampling import SamplerSettings
from ..quant.backends import set_backend
from ..quant.backends import kernel_scheme
from ..quant.formats import format_from_config
from ..runtime import resolve_device
from ..stages import EVALUATORS, Evaluator, RunState
from . import metrics as M
from .generation import EvalSamples, generate_sample
from .lpips_weights import features_state_dict
from .noise_floor import (attention_kernels, check_noise_floor, floor_summary, noise_floor_context,
                          resolve_noise_floor)
from .references import ReferenceCache
from .videoio import NO_VIDEO_LIBRARY, frame_strip, side_by_side, to_float, video_library, write_mp4, write_png

log = logging.getLogger(__name__)


def score_pair(ref: np.ndarray, test: np.ndarray, net: str, device: str) -> dict:
    """Per-frame curves and video means of two uint8 videos (``metrics.video_summary``)."""
    return M.video_summary(M.frame_metrics(to_float(ref), to_float(test), net, device))


def write_sample_videos(run_dir: Path, i: int, ref: np.ndarray, quant: np.ndarray, fps: int, gain: float) -> dict:
    """videos/NNN_{reference,quantized,side_by_side}.mp4; returns their paths relative to ``run_dir``."""
    stem = f"{i:03d}"
    files = {"reference": f"videos/{stem}_reference.mp4", "quantized": f"videos/{stem}_quantized.mp4",
             "side_by_side": f"videos/{stem}_side_by_side.mp4"}
    write_mp4(run_dir / files["reference"], ref, fps)
    write_mp4(run_dir / files["quantized"], quant, fps)
    write_mp4(run_dir / files["side_by_side"], side_by_side(ref, quant, gain), fps)
    return files


def write_strip(run_dir: Path, i: int, ref: np.ndarray, quant: np.ndarray, gain: float) -> str:
    """videos/NNN_strip.png (`videoio.frame_strip`: what `vqx compare` shows per job); its path relative to ``run_dir``."""
    name = f"videos/{i:03d}_strip.png"
    write_png(run_dir / name, frame_strip(ref, quant, gain))
    return name


@EVALUATORS.register("video")
class VideoEvaluator(Evaluator):
    """Orchestrates: settings checks, 16-bit references and noise floor before quantization (`references`,
    `noise_floor`, `generation`), then per sample the quantized video, its scores and files, gathered over ranks."""

    def check(self) -> None:
        from ..prompts import load_prompt_set

        e, model = self.cfg.eval, self.cfg.model
        self.device = resolve_device(model.device)
        if min(e.height, e.width) < M.LPIPS_MIN_SIDE:
            raise UserError(f"eval.height={e.height} eval.width={e.width}: LPIPS needs at least "
                            f"{M.LPIPS_MIN_SIDE} pixels per side; use eval.height/width >= {M.LPIPS_MIN_SIDE}")
        self.samples = EvalSamples(load_prompt_set(e.path, model.task, "eval", limit=e.num_samples),
                                   SamplerSettings.from_config(e), model.task == "i2v")
        fmt = format_from_config(self.cfg.format)
        if e.gemm == "kernel" and not all(kernel_scheme(s) for s in fmt.schemes()):
            from ..export.lightx2v import deployment_gpus

            where = deployment_gpus(fmt)
            raise UserError(f"eval.gemm=kernel needs 8-bit weights and activations (format=w8a8, fp8, fp8_static or fp8_b128), not "
                            f"format={fmt.name}" + (f" (lightx2v runs it on {where})" if where else "")
                            + "; use eval.gemm=fake, the same numbers emulated")
        check_noise_floor(e.noise_floor, self.device)
        self.floor_count = 0 if e.noise_floor == "none" else min(len(self.samples), e.noise_floor_samples or len(self.samples))
        if e.save_videos and video_library() is None:
            raise UserError(NO_VIDEO_LIBRARY + " (or eval.save_videos=false)")
        _, self.lpips_source = features_state_dict(e.lpips_net)  # no weights: fail now, not after generating
        self.refs: list[dict | None] = []  # per sample; None for the samples of other torchrun ranks
        self.floors: list[dict | None] = []

    # ---- before quantization: 16-bit references (cached) and the noise floor -----------------------

    def before_quantization(self, pipe: Any) -> None:
        self.references = ReferenceCache(self.cfg.cache_dir, self.cfg.model, pipe, self.device)
        self.timings = {"reference_generation_s": 0.0, "noise_floor_generation_s": 0.0}
        mine = set(distributed.shard(len(self.samples)))
        self.refs = [self._reference(pipe, i, "reference") if i in mine else None for i in range(len(self.samples))]
        self.floor, self.floor_default = resolve_noise_floor(self.cfg.eval.noise_floor, pipe.transformer,
                                                             self.samples.sampler, self.device)
        self.floors = [self._reference(pipe, i, f"noise_floor/{self.floor}") if i in mine else None
                       for i in range(self.floor_count)]
        hits = sum(r["cache_hit"] for r in self._entries())
        log.info("eval: %d reference and %d noise-floor videos (%d from the cache %s)", sum(map(bool, self.refs)),
                 sum(map(bool, self.floors)), hits, self.references.root)

    def identity(self, i: int, variant: str) -> dict:
        return self.references.identity(self.samples[i], self.samples.settings(i), self.samples.image(i), variant)

    def _reference(self, pipe, i: int, variant: str) -> dict:
        """Sample i's 16-bit video of ``variant`` ("reference" or "noise_floor/<method>"), cached."""
        floor = variant != "reference"

        def make() -> np.ndarray:
            t0 = time.perf_counter()
            desc = f"{'noise floor' if floor else '16-bit reference'} {i + 1}/{len(self.samples)}"
            with noise_floor_context(self.floor) if floor else contextlib.nullcontext():
                video = generate_sample(pipe, self.samples, i, desc, quantized=False)
            self.timings["noise_floor_generation_s" if floor else "reference_generation_s"] += time.perf_counter() - t0
            return video

        return self.references.get(self.identity(i, variant), make)

    def _entries(self) -> list[dict]:
        """This rank's reference and noise-floor cache entries."""
        return [r for r in self.refs + self.floors if r is not None]

    # ---- after quantization: generate, score, write -----------------------------------------------

    def _score(self, pipe, i: int) -> tuple[dict, dict | None, tuple | None]:
        """Generate sample i with the quantized model and score it: (entry, noise-floor scores, (reference,
        quantized) frames for the video files or None), with the time spent generating and scoring."""
        e, s, dev = self.cfg.eval, self.samples[i], str(self.device)
        t0 = time.perf_counter()
        quant = generate_sample(pipe, self.samples, i, f"quantized {i + 1}/{len(self.samples)}", quantized=True)
        self.timings["quantized_generation_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = np.load(self.refs[i]["path"])
        entry = {"index": i, "prompt": s.prompt, "seed": s.seed, "image": s.image_path,
                 **score_pair(ref, quant, e.lpips_net, dev), "reference_cache_hit": self.refs[i]["cache_hit"]}
        floor = None
        if i < self.floor_count:
            fl = np.load(self.floors[i]["path"])
            floor = score_pair(ref, fl, e.lpips_net, dev)
            floor["identical"] = bool(np.array_equal(ref, fl))
            entry["noise_floor"] = {k: floor[k] for k in ("lpips", "psnr", "ssim")}
        self.timings["scoring_s"] += time.perf_counter() - t0
        log.info("eval sample %d: LPIPS %.4f  PSNR %.2f dB  SSIM %.4f%s", i, entry["lpips"], entry["psnr"], entry["ssim"],
                 f"  (noise floor LPIPS {entry['noise_floor']['lpips']:.4f})" if "noise_floor" in entry else "")
        return entry, floor, ((ref, quant) if e.save_videos else None)

    def evaluate(self, state: RunState) -> dict:
        e = self.cfg.eval
        set_backend(state.pipe.transformer, e.gemm)
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
                    entry["files"] = write_sample_videos(self.run_dir, entry["index"], *frames, e.fps, e.diff_gain)
                    entry["strip"] = write_strip(self.run_dir, entry["index"], *frames, e.diff_gain)
                if floor is not None:
                    floors.append(floor)
                videos.append(entry)
        cache_use = distributed.gather_object([r["cache_hit"] for r in self._entries()])
        if not distributed.is_main():
            return {}
        cache_use = [hit for rank in cache_use for hit in rank]

        out = M.aggregate(videos)
        out["noise_floor"] = floor_summary(self.floor, self.floor_default, floors)
        out["noise_floor"]["attention"] = attention_kernels(self.floor, self.floor_default, state.attention)
        if state.attention is not None:  # now with what ran (eval.gemm=kernel: the real kernel's difference)
            out["attention"] = state.attention.report()
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
            "sampler": self.samples.sampler.as_dict(),
            "lpips_net": e.lpips_net,
            "lpips_weights": self.lpips_source,
            "psnr_cap_db": M.PSNR_CAP_DB,
            "pixels": "8-bit frames (round(x*255)); PSNR on [0,1] averaged over frames, each frame capped at "
                      f"{M.PSNR_CAP_DB:g} dB; LPIPS v0.1 on [-1,1]; SSIM torchmetrics (11x11 Gaussian, sigma 1.5)",
            "std": "population std over videos",
            "reference_cache": {"dir": str(self.references.root), "hits": sum(cache_use),
                                "built": len(cache_use) - sum(cache_use)},
            "video_library": video_library() if e.save_videos else None,
            "plot": plot,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},  # under torchrun: rank 0's own
        }
        out["videos"] = videos
        return out
