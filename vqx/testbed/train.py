"""Train wan_mini and save it as the diffusers folder vqx loads with model=wan_mini.

    python -m vqx.testbed.train --out assets/wan_mini --device cuda     # one H100/H200: about 13.5 minutes

Stage 1 trains the VAE (AutoencoderKLWan) to reconstruct data.py clips, then measures the per-channel mean
and std of its latents and writes them into the VAE config (WanPipeline un-normalizes latents with them).
Stage 2 trains the transformer with flow matching on normalized latents of a pool of clips that is refreshed
while it trains; text comes from a frozen random UMT5 through the pipeline's own prompt encoding. Each stage
stops at its step count or its share of --time-budget-s, whichever comes first; the learning rate follows
the same progress, and training.json says which it was. The saved folder is then loaded the way vqx loads
it, samples, a prompt-following score and activation ranges go into model_card.md, and the folder is
published at --out in one rename (an earlier wan_mini folder there is replaced).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError, VqxError, report_and_exit
from ..io import staged_dir, write_json_atomic
from ..models.wan.checkpoint import MARKER
from ..runtime import resolve_device
from . import data

log = logging.getLogger("vqx.testbed.train")

TEXT_LEN = 512  # WanPipeline's max_sequence_length: prompts are zero-padded to it, in training as in sampling
VAE_SHARE = 0.45  # of --time-budget-s for stage 1 (the VAE bounds what can be recognized); stage 2: the rest
OBJECT_WEIGHT = 20.0  # extra L1 weight on object pixels: at 4 the VAE spends its first ~1000 steps on backgrounds
ENCODE_CHUNK = 256  # clips per VAE encode call when filling the latent pool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vqx.testbed.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (replaced if it is an earlier wan_mini folder)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-vae", type=int, default=2500)
    p.add_argument("--steps-transformer", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=256, help="transformer batch (clips)")
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--time-budget-s", type=float, default=780.0,
                   help=f"wall seconds for both training stages (stage 1 gets {VAE_SHARE:.0%}); samples come after")
    p.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--vae-frames", type=int, default=None,
                   help="frames per VAE training clip, a window of a --frames clip (default: all). Fewer is cheaper, "
                        "but the causal VAE then drifts in the chunks it never trained on")
    p.add_argument("--vae-dim", type=int, default=16, help="AutoencoderKLWan base_dim")
    p.add_argument("--dim", type=int, default=256, help="transformer width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--text-dim", type=int, default=128, help="UMT5 d_model (the transformer's text_dim)")
    p.add_argument("--lr-vae", type=float, default=3e-4, help="without warmup Wan's RMS-normed VAE stalls at 5e-4")
    p.add_argument("--lr", type=float, default=5e-4, help="transformer learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved transformer weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of empty prompts")
    p.add_argument("--shift", type=float, default=3.0, help="flow shift of training noise levels and the sampler")
    p.add_argument("--pool", type=int, default=16384, help="clips in the latent pool")
    p.add_argument("--refresh", type=int, default=512, help="pool clips replaced every --refresh-every steps")
    p.add_argument("--refresh-every", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--score-samples", type=int, default=48, help="videos generated for the prompt-following score")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (optional)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--note", default=None,
                   help="a sentence recorded in training.json and on the model card (e.g. that the GPU was shared); "
                        "the files are what this script writes, never edited afterwards")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    if a.size < 32 or a.size % 16:
        raise UserError(f"--size {a.size} must be a multiple of 16 and >= 32 (the VAE halves it 3 times, "
                        "the transformer patches latents in 2x2, LPIPS needs 32 pixels)")
    a.vae_frames = a.frames if a.vae_frames is None else a.vae_frames
    for flag, frames in (("--frames", a.frames), ("--vae-frames", a.vae_frames)):
        if frames < 1 or frames % 4 != 1:
            raise UserError(f"{flag} {frames} must be 4k+1 (Wan's VAE packs 4 frames per latent after the first), "
                            f"e.g. {max(1, frames // 4 * 4 + 1)}")
    if a.vae_frames > a.frames:
        raise UserError(f"--vae-frames {a.vae_frames} must be <= --frames {a.frames}")
    if a.heads < 1 or a.dim % a.heads or (a.dim // a.heads) % 2:
        raise UserError(f"--dim {a.dim} must split into --heads {a.heads} heads of an even size")
    if a.text_dim < 8 or a.text_dim % 4:
        raise UserError(f"--text-dim {a.text_dim} must be a multiple of 4 and >= 8 (UMT5 uses 4 heads)")
    for name in ("steps_vae", "steps_transformer", "batch_size", "vae_batch_size", "vae_dim", "layers", "ffn",
                 "pool", "refresh", "refresh_every", "sample_steps", "log_every"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    if a.score_samples < 0:
        raise UserError(f"--score-samples {a.score_samples} must be >= 0")
    if a.time_budget_s <= 0:
        raise UserError(f"--time-budget-s {a.time_budget_s} must be > 0")
    if not 0 <= a.cfg_dropout < 1 or not 0 <= a.ema < 1:
        raise UserError(f"--cfg-dropout {a.cfg_dropout} and --ema {a.ema} must be in [0, 1)")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise UserError(f"--out {out} exists and is not a wan_mini folder (no {MARKER}); pick another --out or "
                        "remove it")


def pick_device(name: str) -> torch.device:
    return resolve_device(name, "--device ")


def build_models(a: argparse.Namespace, vocab_size: int):
    """(text_encoder bf16 frozen, vae fp32, transformer fp32), seeded."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(a.seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=a.text_dim, d_kv=a.text_dim // 4, d_ff=2 * a.text_dim, num_layers=2,
        num_heads=4)).eval().requires_grad_(False).to(torch.bfloat16)
    vae = AutoencoderKLWan(base_dim=a.vae_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=a.heads, attention_head_dim=a.dim // a.heads, in_channels=16,
        out_channels=16, text_dim=a.text_dim, freq_dim=256, ffn_dim=a.ffn, num_layers=a.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    return text_encoder, vae, transformer


class Stage:
    """Step/time bookkeeping of one training stage: deadline, learning-rate factor, loss log."""

    def __init__(self, name: str, steps: int, budget_s: float, batch_size: int, log_every: int):
        self.name, self.steps_planned, self.budget_s, self.batch_size = name, steps, budget_s, batch_size
        self.log_every = log_every
        self.t0 = time.monotonic()
        self.steps = 0
        self.stopped_early = False
        self.curve_steps: list[int] = []
        self.curve: list[float] = []
        self.extra: dict[str, float] = {}
        self._sum: torch.Tensor | None = None
        self._count = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def should_stop(self) -> bool:
        """Out of time (checked from the second step on: every stage trains at least one step)."""
        if self.steps and self.elapsed() >= self.budget_s:
            self.stopped_early = True
        return self.stopped_early

    def lr_factor(self, warmup: int = 100) -> float:
        """Linear warmup, then cosine to 10% over whichever runs out first: the steps or the time."""
        progress = min(1.0, max(self.steps / self.steps_planned, self.elapsed() / self.budget_s))
        warm = min(1.0, (self.steps + 1) / min(warmup, max(1, self.steps_planned // 10)))
        return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    def record(self, loss: torch.Tensor) -> None:
        """Accumulate on the device; one host sync per log interval."""
        loss = loss.detach().float()
        self._sum = loss if self._sum is None else self._sum + loss
        self._count += 1
        self.steps += 1
        if self.steps % self.log_every == 0 or self.steps == self.steps_planned:
            self.flush()

    def flush(self) -> None:
        if not self._count:
            return
        value = float(self._sum) / self._count
        self.curve_steps.append(self.steps)
        self.curve.append(value)
        self._sum, self._count = None, 0
        log.info("%s step %d/%d loss %.5f  %.1f s  %.2f steps/s", self.name, self.steps, self.steps_planned, value,
                 self.elapsed(), self.steps / max(self.elapsed(), 1e-9))

    def summary(self) -> dict:
        self.flush()
        return {"steps": self.steps, "steps_planned": self.steps_planned, "batch_size": self.batch_size,
                "wall_s": round(self.elapsed(), 2), "budget_s": round(self.budget_s, 2),
                "stopped_early": self.stopped_early, "steps_per_s": round(self.steps / max(self.elapsed(), 1e-9), 4),
                "final_loss": self.curve[-1] if self.curve else float("nan"),
                "curve": {"steps": self.curve_steps, "loss": self.curve}, **self.extra}


def autocast(device: torch.device):
    # bf16 on CUDA (tensor cores); CPU trains in fp32, where bf16 autocast is slower, not faster
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_vae(vae, a: argparse.Namespace, device: torch.device, budget_s: float) -> dict:
    vae.to(device).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr_vae, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed + 1)
    stage = Stage("vae", a.steps_vae, budget_s, a.vae_batch_size, a.log_every)
    mse = torch.zeros((), device=device)  # running mean (EMA, bias-corrected at the end) for the final PSNR
    for _ in range(a.steps_vae):
        if stage.should_stop():
            break
        for g in opt.param_groups:
            g["lr"] = a.lr_vae * stage.lr_factor()
        x, alpha = data.render(data.sample_clips(a.vae_batch_size, gen), a.size, a.frames, device)
        start = int(torch.randint(a.frames - a.vae_frames + 1, (1,), generator=gen))  # same motion per frame
        x, alpha = x[:, :, start:start + a.vae_frames], alpha[:, :, start:start + a.vae_frames]
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
        err = rec.float() - x
        weight = 1 + OBJECT_WEIGHT * alpha
        rec_loss = (err.abs() * weight).mean() / weight.mean()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = rec_loss + a.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stage.record(loss)
        mse.lerp_(err.detach().pow(2).mean(), 0.05)
    mse_final = float(mse) / (1 - 0.95 ** stage.steps)
    stage.extra["psnr"] = round(10 * math.log10(4.0 / max(mse_final, 1e-12)), 2)  # pixels span [-1, 1]
    vae.eval().requires_grad_(False)
    return stage.summary()


@torch.no_grad()
def encode_clips(vae, clips: data.Clips, a: argparse.Namespace, device: torch.device) -> torch.Tensor:
    out = []
    for start in range(0, len(clips), ENCODE_CHUNK):
        part = data.Clips(clips.labels[start:start + ENCODE_CHUNK],
                          {k: v[start:start + ENCODE_CHUNK] for k, v in clips.params.items()})
        x, _ = data.render(part, a.size, a.frames, device)
        with autocast(device):
            out.append(vae.encode(x).latent_dist.sample().float())
    return torch.cat(out)


@torch.no_grad()
def prompt_table(pipe, device: torch.device) -> tuple[torch.Tensor, int]:
    """Embeddings of every grammar prompt (rows in `data.prompt_index` order) and of "" (last row), from
    the pipeline's own encode_prompt, cut to the longest prompt's tokens; the pipeline pads with zeros from
    there to TEXT_LEN, and the attention mask makes the tokens before independent of that padding."""
    prompts = data.all_prompts() + [""]
    length = max(len(pipe.tokenizer(p).input_ids) for p in prompts)
    rows = []
    for start in range(0, len(prompts), 1024):
        emb, _ = pipe.encode_prompt(prompts[start:start + 1024], do_classifier_free_guidance=False,
                                    max_sequence_length=length, device=device, dtype=torch.float32)
        rows.append(emb)
    return torch.cat(rows), length


class LatentPool:
    """Normalized latents of rendered clips with their prompt indices; a ring of slots is re-rendered and
    re-encoded every few steps, so the transformer keeps seeing new clips at a fraction of the encode cost."""

    def __init__(self, vae, a: argparse.Namespace, device: torch.device):
        self.vae, self.a, self.device = vae, a, device
        self.gen = torch.Generator().manual_seed(a.seed + 2)
        clips = data.sample_clips(a.pool, self.gen)
        raw = encode_clips(vae, clips, a, device)
        dims = (0, 2, 3, 4)
        self.mean = raw.mean(dim=dims)
        self.std = raw.std(dim=dims).clamp_min(1e-4)
        self.latents = self._normalize(raw)
        self.prompts = data.prompt_index(clips.labels).to(device)
        self.ptr = 0

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.view(1, -1, 1, 1, 1)) / self.std.view(1, -1, 1, 1, 1)

    def refresh(self) -> None:
        n = min(self.a.refresh, len(self.latents))
        clips = data.sample_clips(n, self.gen)
        idx = (torch.arange(n) + self.ptr) % len(self.latents)
        self.latents[idx.to(self.device)] = self._normalize(encode_clips(self.vae, clips, self.a, self.device))
        self.prompts[idx.to(self.device)] = data.prompt_index(clips.labels).to(self.device)
        self.ptr = int((self.ptr + n) % len(self.latents))


def train_transformer(transformer, pool: LatentPool, table: torch.Tensor, a: argparse.Namespace,
                      device: torch.device, budget_s: float) -> dict:
    transformer.to(device).train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    forward = torch.compile(transformer) if a.compile else transformer
    gen = torch.Generator(device=device).manual_seed(a.seed + 3)
    empty = len(table) - 1
    length = table.shape[1]
    stage = Stage("transformer", a.steps_transformer, budget_s, a.batch_size, a.log_every)
    for _ in range(a.steps_transformer):
        if stage.should_stop():
            break
        if stage.steps and stage.steps % a.refresh_every == 0:
            pool.refresh()
        for g in opt.param_groups:
            g["lr"] = a.lr * stage.lr_factor()
        b = a.batch_size
        pick = torch.randint(len(pool.latents), (b,), device=device, generator=gen)
        x0 = pool.latents[pick]
        drop = torch.rand(b, device=device, generator=gen) < a.cfg_dropout
        rows = torch.where(drop, torch.full_like(pick, empty), pool.prompts[pick])
        text = F.pad(table[rows], (0, 0, 0, TEXT_LEN - length))
        noise = torch.randn(x0.shape, device=device, generator=gen)
        u = torch.rand(b, device=device, generator=gen)
        sigma = a.shift * u / (1 + (a.shift - 1) * u)  # the sampler's shifted noise levels
        s = sigma.view(b, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with autocast(device):
            pred = forward(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)  # flow_prediction: x0 = x_t - sigma * output
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(a.ema, (1 + stage.steps) / (10 + stage.steps))  # short runs: EMA warms up
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        stage.record(loss)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    transformer.eval().requires_grad_(False)
    return stage.summary()


def save_folder(folder: Path, pipe, transformer, vae, a: argparse.Namespace) -> None:
    """The diffusers layout vqx loads: transformer bf16 (Wan's fp32 modules kept), VAE fp32, text encoder bf16."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from ..models.wan.tiny import cast_transformer

    out = WanPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder.to("cpu", torch.bfloat16),
        vae=copy.deepcopy(vae).to("cpu"),  # trained in fp32 (autocast computes in bf16)
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=a.shift),
        transformer=cast_transformer(copy.deepcopy(transformer).to("cpu"), torch.bfloat16))
    out.save_pretrained(folder, safe_serialization=True)
    # transformers 5 names the class TokenizersBackend, which 4.x lacks; PreTrainedTokenizerFast loads in both
    index, tok_cfg = folder / "model_index.json", folder / "tokenizer" / "tokenizer_config.json"
    fast = ["transformers", "PreTrainedTokenizerFast"]
    write_json_atomic(index, {**json.loads(index.read_text()), "tokenizer": fast})
    write_json_atomic(tok_cfg, {**json.loads(tok_cfg.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"})
    calib, evals = data.prompt_sets()
    for split, samples in (("calib", calib), ("eval", evals)):
        write_json_atomic(folder / split / "prompts.json", {
            "version": 1, "task": "t2v",
            "description": f"wan_mini {split} prompts from the training grammar (vqx/testbed/data.py)",
            "samples": samples})


def sample_and_score(folder: Path, a: argparse.Namespace, device: torch.device) -> dict:
    """Load the folder as vqx does, generate the eval prompts (grid, mp4, activation ranges) and score."""
    from omegaconf import OmegaConf

    from ..eval.videoio import write_mp4
    from ..models.loading import load_pipeline
    from ..models.sampling import SamplerSettings, generate
    from . import report, score

    cfg = OmegaConf.create({"family": "wan", "source": "mini", "task": "t2v", "path": str(folder), "dtype": "bfloat16",
                            "device": str(device), "seed": 0})
    pipe = load_pipeline(cfg)
    settings = SamplerSettings(height=a.size, width=a.size, num_frames=a.frames, steps=a.sample_steps,
                               guidance=a.guidance, shift=a.shift)
    evals = json.loads((folder / "eval" / "prompts.json").read_text())["samples"]
    ranges = report.InputRanges(pipe.transformer)
    videos = []
    for i, s in enumerate(evals):
        if i == 2:
            ranges.close()  # two videos: 80 transformer calls over the whole trajectory
        videos.append(generate(pipe, s["prompt"], settings, s["seed"]))
    ranges.close()
    prompts = [s["prompt"] for s in evals]
    report.sample_grid_png(folder / "samples" / "grid.png", videos, prompts)
    write_mp4(folder / "samples" / "samples.mp4", report.tile_videos(videos), fps=8)
    scores = [score.score_video(v, p) for v, p in zip(videos, prompts)]
    g = torch.Generator().manual_seed(a.seed + 4)
    for i, p in enumerate(data.sample_clips(a.score_samples, g).prompts()):
        scores.append(score.score_video(generate(pipe, p, settings, 5000 + i), p))
    summary = score.summarize(scores)
    clips = data.sample_clips(32, g)  # the score on training clips: what a perfect model would get
    truth = ((data.render(clips, a.size, a.frames)[0] + 1) / 2).permute(0, 2, 3, 4, 1).numpy()
    summary["ground_truth"] = score.summarize([score.score_video(v, p) for v, p in zip(truth, clips.prompts())])
    return {"score": summary, "activation_ranges": ranges.summary(),
            "sampler": settings.as_dict(), "eval_readings": [s["reading"] for s in scores[:len(evals)]]}


def folder_size(folder: Path) -> tuple[float, float]:
    sizes = [p.stat().st_size for p in folder.rglob("*") if p.is_file()]
    return sum(sizes) / 2**20, max(sizes, default=0) / 2**20


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    t_start = time.monotonic()
    check_args(a)
    device = pick_device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotuned convolutions pay off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(a.out).expanduser().resolve()
    # an earlier wan_mini folder at --out is replaced; the folder is meant to be shared and committed: 0644/0755
    with staged_dir(out, owned=True, mode=(0o644, 0o755)) as tmp:
        info = train_and_save(a, argv, device, tmp, t_start)
    log.info("wrote %s (%.1f MB) in %.0f s", out, info["size_mb"], time.monotonic() - t_start)
    return out


def train_and_save(a: argparse.Namespace, argv: list[str], device: torch.device, tmp: Path, t_start: float) -> dict:
    import diffusers
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from . import report

    tokenizer = data.build_tokenizer()
    text_encoder, vae, transformer = build_models(a, len(tokenizer))
    params = {k: sum(p.numel() for p in m.parameters())
              for k, m in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder))}
    log.info("device %s; parameters: %s", device, {k: f"{v / 1e6:.2f}M" for k, v in params.items()})
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.to(device), vae=vae, transformer=transformer,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=a.shift))
    table, _ = prompt_table(pipe, device)

    stages = {"vae": train_vae(vae, a, device, VAE_SHARE * a.time_budget_s)}
    budget_left = a.time_budget_s - (time.monotonic() - t_start)
    t_pool = time.monotonic()
    pool = LatentPool(vae, a, device)
    vae.register_to_config(latents_mean=[round(float(v), 5) for v in pool.mean],
                           latents_std=[round(float(v), 5) for v in pool.std])
    pool_s = time.monotonic() - t_pool
    log.info("latent pool of %d clips in %.1f s; latents_mean %s, latents_std %s", a.pool, pool_s,
             vae.config.latents_mean, vae.config.latents_std)
    stages["transformer"] = train_transformer(transformer, pool, table, a, device, max(1.0, budget_left - pool_s))
    stages["transformer"]["pool_s"] = round(pool_s, 2)
    del pool
    save_folder(tmp, pipe, transformer, vae, a)

    info = {"args": vars(a), "command": shlex.join(["python", "-m", "vqx.testbed.train", *argv]), "stages": stages,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "params": params,
            "tokens": ((a.frames - 1) // 4 + 1) * (a.size // 16) ** 2, "example_prompt": data.all_prompts()[0],
            "latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std}
    if a.note:
        info["note"] = a.note
    write_json_atomic(tmp / MARKER, info)  # the folder is complete from here on; the final version follows
    t_samples = time.monotonic()
    info.update(sample_and_score(tmp, a, device))
    info["samples_s"] = round(time.monotonic() - t_samples, 2)
    report.loss_curve_png(tmp / "loss_curve.png", {f"{k} loss": (s["curve"]["steps"], s["curve"]["loss"])
                                                   for k, s in stages.items()})
    info["wall_s"] = round(time.monotonic() - t_start, 2)
    info["size_mb"], largest = folder_size(tmp)
    info["size_mb"] += 0.02  # the card and training.json, written next
    if info["size_mb"] > 25 or largest > 15:
        log.warning("the folder is %.1f MB (largest file %.1f MB): over the 25 MB / 15 MB the repo allows; "
                    "use a smaller --dim/--layers/--vae-dim", info["size_mb"], largest)
    report.write_model_card(tmp / "model_card.md", info)
    write_json_atomic(tmp / MARKER, info)
    return info


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except (VqxError, Exception) as exc:  # noqa: BLE001 -- one line, exit 2 for bad input (VQX_DEBUG=1: traceback)
        report_and_exit(exc)
