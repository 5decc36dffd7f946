"""What a wan_mini training run shows about itself: loss-curve and sample-grid PNGs (drawn with PIL, no
matplotlib on the GPU image), the activation ranges of the transformer's linear inputs, and model_card.md."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_path, write_text_atomic

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def loss_curve_png(path: Path, curves: dict[str, tuple[list[int], list[float]]], size=(720, 420)) -> None:
    """One panel per curve (steps, values), log-scaled y."""
    panels = [(k, s, v) for k, (s, v) in curves.items() if len(v) > 0]
    w, h = size
    img = Image.new("RGB", (w, h * max(1, len(panels))), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, (name, steps, values) in enumerate(panels):
        top, left, right, bottom = i * h + 30, 70, w - 20, (i + 1) * h - 40
        vals = np.log10(np.maximum(np.asarray(values, dtype=np.float64), 1e-8))
        lo, hi = float(vals.min()), float(vals.max())
        hi = hi if hi > lo else lo + 1
        x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, top - 20), f"{name} (log scale)", fill="black", font=font)
        for frac in (0, 0.5, 1):
            y = bottom - frac * (bottom - top)
            draw.text((5, y - 6), f"{10 ** (lo + frac * (hi - lo)):.3g}", fill="black", font=font)
            x = left + frac * (right - left)
            draw.text((x - 15, bottom + 8), f"{round(x0 + frac * (x1 - x0))}", fill="black", font=font)
        pts = [(left + (s - x0) / (x1 - x0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
               for s, v in zip(steps, vals)]
        if len(pts) > 1:
            draw.line(pts, fill=_COLORS[i % len(_COLORS)], width=2)
        draw.text((right - 60, bottom + 8), "step", fill="black", font=font)
    _save_png(img, path)


def sample_grid_png(path: Path, videos: list[np.ndarray], prompts: list[str], columns: int = 6, zoom: int = 2) -> None:
    """One row per video (float [F, H, W, 3] in [0, 1]): ``columns`` frames spread over the clip, its prompt above."""
    f, h, w, _ = videos[0].shape
    picks = np.linspace(0, f - 1, columns).round().astype(int)
    label = 14
    img = Image.new("RGB", (columns * w * zoom, len(videos) * (h * zoom + label)), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for r, (video, prompt) in enumerate(zip(videos, prompts)):
        y = r * (h * zoom + label)
        draw.text((2, y + 1), prompt, fill="black", font=font)
        for c, i in enumerate(picks):
            frame = Image.fromarray(_uint8(video[i])).resize((w * zoom, h * zoom), Image.NEAREST)
            img.paste(frame, (c * w * zoom, y + label))
    _save_png(img, path)


def tile_videos(videos: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """uint8 [F, rows*H, columns*W, 3]: the videos side by side (for one mp4)."""
    rows = math.ceil(len(videos) / columns)
    f, h, w, _ = videos[0].shape
    out = np.zeros((f, rows * h, columns * w, 3), dtype=np.uint8)
    for k, v in enumerate(videos):
        r, c = divmod(k, columns)
        out[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = _uint8(v)
    return out


class InputRanges:
    """Per-input-channel absmax of every linear in the transformer blocks, over all calls while attached."""

    def __init__(self, transformer: torch.nn.Module):
        self.absmax: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name))
                        for name, m in transformer.named_modules()
                        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
            self.absmax[name] = m if name not in self.absmax else torch.maximum(self.absmax[name], m)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def summary(self) -> dict:
        """Per linear: max and median channel absmax and their ratio; per kind (name without the block):
        the largest and the median ratio over blocks."""
        layers = {}
        for name, m in sorted(self.absmax.items(), key=lambda kv: _block_order(kv[0])):
            med = float(m.median())
            layers[name] = {"max": float(m.max()), "median": med, "ratio": float(m.max()) / max(med, 1e-12)}
        kinds: dict[str, list[float]] = {}
        for name, row in layers.items():
            kinds.setdefault(name.split(".", 2)[2], []).append(row["ratio"])
        return {"layers": layers,
                "kinds": {k: {"max_ratio": max(v), "median_ratio": float(np.median(v))} for k, v in kinds.items()}}


def _block_order(name: str):
    parts = name.split(".")
    return (int(parts[1]), ".".join(parts[2:])) if len(parts) > 2 and parts[1].isdigit() else (-1, name)


def write_model_card(path: Path, info: dict) -> None:
    a, t = info["args"], info["stages"]
    score, ranges = info.get("score"), info.get("activation_ranges")
    lines = [
        "# wan_mini",
        "",
        "A small Wan2.1 text-to-video model (diffusers `WanTransformer3DModel`, `AutoencoderKLWan`, UMT5 text encoder,",
        "word-level tokenizer) trained from scratch on procedural videos: one saturated shape (circle, square,",
        "triangle) that moves, bounces, rotates, grows or shrinks over a dull striped, checkered, dotted or gradient",
        "background, with a prompt from a small grammar (`vqx/testbed/data.py`), e.g.",
        f"\"{info['example_prompt']}\". It exists so that quantization errors can be seen and scored.",
        "",
        "## Training",
        "",
        f"- command: `{info['command']}`",
        f"- device: {info['device']}; torch {info['torch']}, diffusers {info['diffusers']}; seed {a['seed']}",
        f"- wall time: {info['wall_s']:.0f} s in all (budget for the two training stages: {a['time_budget_s']} s)",
        *([f"- note: {info['note']}"] if info.get("note") else []),
        f"- video: {a['size']}x{a['size']}, {a['frames']} frames -> latents 16x{(a['frames'] - 1) // 4 + 1}x"
        f"{a['size'] // 8}x{a['size'] // 8}, {info['tokens']} transformer tokens",
        f"- transformer: dim {a['dim']} ({a['heads']} heads), {a['layers']} layers, ffn {a['ffn']}, "
        f"{info['params']['transformer'] / 1e6:.2f} M parameters, saved in bf16",
        f"- VAE: base_dim {a['vae_dim']}, z_dim 16, {info['params']['vae'] / 1e6:.2f} M parameters, fp32",
        f"- text encoder: UMT5 d_model {a['text_dim']}, {info['params']['text_encoder'] / 1e6:.2f} M parameters, "
        "random and frozen (bf16): prompts map to fixed, distinct embeddings, the empty prompt included, and the",
        "  transformer learns to read them",
        "",
        "| stage | steps done / planned | batch | wall s | final loss | stopped by the time budget |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in t.items():
        lines.append(f"| {name} | {s['steps']} / {s['steps_planned']} | {s['batch_size']} | {s['wall_s']:.0f} | "
                     f"{s['final_loss']:.4g} | {'yes' if s['stopped_early'] else 'no'} |")
    lines += [
        "",
        ("VAE: whole clips" if a['vae_frames'] == a['frames'] else f"VAE: {a['vae_frames']}-frame windows of the clips")
        + f", L1 weighted towards the object + {a['kl_weight']:g} KL; "
        f"reconstruction PSNR at the end {t['vae'].get('psnr', float('nan')):.1f} dB.",
        f"Transformer: flow matching as diffusers' UniPC `flow_prediction` sampler expects (x_t = (1-s) x0 + s noise, "
        f"target noise - x0, timestep 1000 s, s uniform then shifted by {a['shift']}), AdamW, EMA {a['ema']}, "
        f"{a['cfg_dropout']:.0%} empty prompts for classifier-free guidance.",
        "",
        "![loss curves](loss_curve.png)",
        "",
        "## Samples",
        "",
        f"`vqx.models.sampling.generate`, {info['sampler']['steps']} steps, guidance {info['sampler']['guidance']}, "
        f"shift {info['sampler']['shift']}, bf16 transformer; the eval prompts (`eval/prompts.json`) with their seeds. "
        "Also as `samples/samples.mp4`.",
        "",
        "![samples](samples/grid.png)",
        "",
    ]
    if score:
        acc, ch = score["accuracy"], score["chance"]
        lines += ["## Prompt following", "",
                  f"`vqx/testbed/score.py` on {score['n']} videos (the eval prompts, then random grammar prompts; "
                  "same sampler):", "",
                  "| attribute | accuracy | chance |", "|---|---|---|"]
        lines += [f"| {k} | {acc[k]:.2f} | {ch[k]:.2f} |" for k in acc]
        lines += [f"| mean | {score['mean']:.2f} | {score['mean_chance']:.2f} |", ""]
        if "ground_truth" in score:
            lines += [f"The same score on training clips (ground truth): {score['ground_truth']['mean']:.2f}.", ""]
    if ranges:
        lines += ["## Activation ranges", "",
                  "Per input channel absmax of each block linear while sampling the first eval prompts; ratio = "
                  "largest channel / median channel (large ratios are the outliers SmoothQuant/AWQ address).", "",
                  "| linear | max ratio over blocks | median ratio |", "|---|---|---|"]
        lines += [f"| {k} | {v['max_ratio']:.1f} | {v['median_ratio']:.1f} |" for k, v in ranges["kinds"].items()]
        lines.append("")
    lines += ["## Files", "",
              "`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` "
              "(`WanPipeline.from_pretrained(path, local_files_only=True)`), `calib/` and `eval/prompts.json` "
              "(vqx's default prompt sets for model=wan_mini), `training.json` (everything above as numbers).",
              f"Folder size: {info['size_mb']:.1f} MB.", ""]
    write_text_atomic(path, "\n".join(lines))


def _uint8(video: np.ndarray) -> np.ndarray:
    return np.round(np.clip(video, 0, 1) * 255).astype(np.uint8)


def _save_png(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
