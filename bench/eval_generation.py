"""Wall time of 16-bit reference generation vs fake-quantized generation, Wan2.1-1.3B at 480p x 81 frames.

Evaluation generates every video twice (16-bit reference, quantized model), so fake quantization must not
make the second much slower. Building the full pipeline needs the real checkpoint (UMT5-XXL alone is 5B
parameters), so this times what dominates generation: the transformer's denoising calls, two per step
(classifier-free guidance), on random bf16 weights and random text embeddings. Quantization is vqx's own
RTN fake quant (QuantLinear: weights dequantized once, activations quantized per token every call).

    python bench/eval_generation.py                 # GPU, full size: writes bench/results/eval_generation.json
    python bench/eval_generation.py --smoke         # tiny size, seconds on CPU (a check that it runs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import add_note_argument, device_name, write_results

from vqx.algorithms.materialize import materialize
from vqx.models.adapter import LayerSelection, quant_targets
from vqx.quant.formats import get_scheme

# Wan2.1-T2V-1.3B (diffusers config) and its 480p x 81-frame latent: 21 x 60 x 104, 32,760 tokens.
FULL = dict(arch=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads"),
            latent=(16, 21, 60, 104), text_tokens=512)
SMOKE = dict(arch=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                       out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
             latent=(16, 2, 4, 4), text_tokens=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_denoising(transformer, inputs: dict, steps: int, device: torch.device) -> list[float]:
    """Seconds per denoising step (two transformer calls: conditional and unconditional), after a warm-up."""
    transformer(**inputs["cond"], return_dict=False)
    sync(device)
    times = []
    for step in range(steps):
        t = torch.full((1,), 1000.0 * (1 - step / steps), device=device)
        sync(device)
        t0 = time.perf_counter()
        for branch in ("cond", "uncond"):
            transformer(**{**inputs[branch], "timestep": t}, return_dict=False)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny transformer on CPU-sized latents (checks the script)")
    p.add_argument("--steps", type=int, default=3, help="timed denoising steps per configuration (default 3)")
    p.add_argument("--formats", default="w8a8,fp8", help="comma-separated vqx formats (default w8a8,fp8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="results file, under bench/results/ unless absolute (default eval_generation[_smoke].json)")
    add_note_argument(p)
    args = p.parse_args()

    from diffusers import WanTransformer3DModel

    from vqx.models.wan.tiny import cast_transformer

    spec = SMOKE if args.smoke else FULL
    device = torch.device(args.device)
    if device.type == "cpu" and not args.smoke:
        print("note: full size on CPU takes hours per call; use --smoke or a GPU", file=sys.stderr)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    inputs = {}
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, *spec["latent"], generator=gen).to(device, dtype)
    for branch in ("cond", "uncond"):
        text = torch.randn(1, spec["text_tokens"], spec["arch"]["text_dim"], generator=gen).to(device, dtype)
        inputs[branch] = {"hidden_states": latent, "encoder_hidden_states": text,
                          "timestep": torch.full((1,), 999.0, device=device)}
    frames = (spec["latent"][1] - 1) * 4 + 1
    tokens = spec["latent"][1] * (spec["latent"][2] // 2) * (spec["latent"][3] // 2)

    rows = []
    for fmt_name in ["bf16"] + [f for f in args.formats.split(",") if f]:
        # A fresh model per row (same seed): materialize replaces the linears in place.
        with torch.device(device):
            torch.manual_seed(0)
            # Wan's fp32 modules (rope, norms, time embedder) stay fp32, as from_pretrained(torch_dtype=...) keeps them
            transformer = cast_transformer(WanTransformer3DModel(**spec["arch"]), dtype).eval()
        t0 = time.perf_counter()
        if fmt_name != "bf16":
            targets = quant_targets(transformer, LayerSelection())
            materialize(transformer, targets, {t.name: get_scheme(fmt_name) for t in targets}, {})
        sync(device)
        quantize_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_denoising(transformer, inputs, args.steps, device)
        rows.append({"format": fmt_name, "step_s_mean": statistics.fmean(times), "step_s_min": min(times),
                     "step_s": times, "quantize_s": quantize_s,
                     "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None})
        del transformer
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = rows[0]["step_s_mean"]
    for r in rows:
        r["ratio_vs_bf16"] = r["step_s_mean"] / base

    device_label = device_name()
    print(f"\nWan2.1 transformer {'(smoke: tiny)' if args.smoke else '1.3B'}, {frames} frames, "
          f"latent {spec['latent'][1]}x{spec['latent'][2]}x{spec['latent'][3]} ({tokens} tokens), bf16, "
          f"{args.steps} steps x 2 calls (CFG), {device_label}")
    print(f"{'format':<8} {'s/step':>9} {'min':>9} {'x bf16':>7} {'quantize s':>11} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['format']:<8} {r['step_s_mean']:9.4f} {r['step_s_min']:9.4f} {r['ratio_vs_bf16']:7.3f} "
              f"{r['quantize_s']:11.2f} {peak:>9}")
    print("A 50-step video costs ~50 x s/step (plus VAE decode, the same for both runs).")

    out = write_results(args.out or ("eval_generation_smoke.json" if args.smoke else "eval_generation.json"), rows, {
        "benchmark": "eval_generation",
        "what": "transformer denoising steps (2 calls each, CFG) of 16-bit reference vs vqx RTN fake-quant generation",
        "smoke": args.smoke,
        "model": "tiny Wan transformer" if args.smoke else "Wan2.1-T2V-1.3B transformer (random init)",
        "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in spec["arch"].items()},
        "latent": list(spec["latent"]), "frames": frames, "tokens": tokens, "text_tokens": spec["text_tokens"],
        "dtype": "bfloat16", "steps_timed": args.steps,
    }, note=args.note)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
