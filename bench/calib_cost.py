"""Calibration + algorithm cost with the default settings, for the full-size Wan2.1 architectures.

Random weights (time and memory do not depend on them), tiny VAE/text-encoder stand-ins. The capture
runs the real sampling loop at the model's default resolution; the algorithm runs block by block.
Prints a table and writes bench/results/calib_cost.json.

    python bench/calib_cost.py                       # 1.3B and 14B, smoothquant (the default algorithm)
    python bench/calib_cost.py --arch 1.3B --algorithms smoothquant,gptq
    python bench/calib_cost.py --smoke               # tiny sizes on CPU: checks the script runs
    python bench/calib_cost.py --arch 14B --num-layers 4 --out calib_cost_14b.json   # 4 of 40 blocks, scaled
    python bench/calib_cost.py --arch 1.3B algorithm.alpha=0.75 --out calib_cost_alpha075.json  # any overrides last
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import ROOT, Stopwatch, add_note_argument, peak_gpu_gib, peak_host_rss_gib, print_table, write_results

MODEL_OPTION = {"1.3B": "wan2.1_t2v_1.3b", "14B": "wan2.1_t2v_14b"}


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    import vqx.plugins  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def _missing_blocks_ballast(transformer, arch: str, device: str):
    """With --num-layers, hold the GPU memory the left-out blocks would take, so that where block inputs
    live (GPU or pinned host, chosen from free memory) and the peak match the whole model."""
    from vqx.models.wan.synthetic import WAN_ARCHS

    missing = WAN_ARCHS[arch]["num_layers"] - len(transformer.blocks)
    if device != "cuda" or missing <= 0:
        return None
    block_bytes = sum(p.numel() * p.element_size() for p in transformer.blocks[0].parameters())
    return torch.empty(missing * block_bytes, dtype=torch.uint8, device=device)


def measure(arch: str, algorithms: list[str], smoke: bool, num_layers: int | None, overrides: list[str]) -> list[dict]:
    from vqx.algorithms.runner import _residency, quantize_blockwise
    from vqx.cache import DiskCache
    from vqx.calib.capture import load_or_capture
    from vqx.models.wan.synthetic import WAN_ARCHS, build_synthetic_pipeline
    from vqx.experiment import plan_targets
    from vqx.quant.formats import format_from_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = ["calib.height=32", "calib.width=32", "calib.num_frames=5", "calib.steps=2", "calib.num_prompts=1"] if smoke else []
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = DiskCache(cache_dir)
        for algorithm in algorithms:
            cfg = compose([f"model={MODEL_OPTION[arch]}", "model.path=/unused", f"algorithm={algorithm}", *extra, *overrides])
            with Stopwatch() as build:
                pipe = build_synthetic_pipeline(arch, torch.bfloat16, device, num_layers=num_layers)
            ballast = _missing_blocks_ballast(pipe.transformer, arch, device)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with Stopwatch() as capture_time:
                capture = load_or_capture(pipe, cfg.calib, "t2v", {"synthetic": arch, "layers": num_layers}, cache)
            targets, schemes = plan_targets(pipe.transformer, format_from_config(cfg.format, len(pipe.transformer.blocks)))
            home = str(_residency(pipe.transformer, capture, torch.device(device)))
            with Stopwatch() as algo_time:
                quantize_blockwise(pipe.transformer, capture, targets, schemes, cfg.algorithm, cfg.calib)
            rows.append({
                "arch": arch, "blocks": len(pipe.transformer.blocks), "algorithm": algorithm, "format": cfg.format.name,
                "overrides": overrides, "alpha": cfg.algorithm.get("alpha"),
                "prompts": cfg.calib.num_prompts, "capture_steps": cfg.calib.steps,
                "resolution": f"{cfg.calib.width}x{cfg.calib.height}x{cfg.calib.num_frames}",
                "full_blocks": WAN_ARCHS[arch]["num_layers"], "block_inputs_on": home,
                "calls": len(capture.calls), "capture_cached": capture.cache_hit,
                "capture_s": capture_time.seconds, "algorithm_s": algo_time.seconds,
                "total_s": capture_time.seconds + algo_time.seconds,
                "peak_gpu_gib": peak_gpu_gib(), "peak_host_rss_gib": peak_host_rss_gib(), "build_s": build.seconds,
            })
            scale = WAN_ARCHS[arch]["num_layers"] / len(pipe.transformer.blocks)
            if scale != 1:  # every block costs the same: time scales with the block count
                rows[-1]["est_full_total_s"] = round(rows[-1]["total_s"] * scale, 1)
            print_table(rows[-1:], list(rows[-1]))
            del pipe, capture, ballast
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="1.3B,14B")
    ap.add_argument("--algorithms", default="smoothquant")
    ap.add_argument("--num-layers", type=int, default=None, help="fewer blocks (say so when reporting)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="calib_cost.json", help="results file under bench/results/")
    add_note_argument(ap)
    ap.add_argument("overrides", nargs="*", help="run.py overrides of the calibration and the recipe (e.g. algorithm.alpha=0.75)")
    args = ap.parse_args()
    rows = []
    for arch in args.arch.split(","):
        rows += measure(arch, args.algorithms.split(","), args.smoke, 2 if args.smoke else args.num_layers, args.overrides)
    cols = ["arch", "blocks", "algorithm", "calls", "capture_s", "algorithm_s", "total_s", "peak_gpu_gib", "peak_host_rss_gib"]
    print()
    print_table(rows, cols)
    if not args.smoke:
        print("wrote", write_results(args.out, rows, note=args.note))


if __name__ == "__main__":
    main()
