"""Is the cheap default capture (10 denoising steps) as good as capturing the full 50-step trajectory?

Both schedules sample the same prompts and seeds over the same noise range; we compare the statistics
SmoothQuant and AWQ use (per-channel absmax and mean |x| of every input group of every block) and the
SmoothQuant factors they give. Random full-size 1.3B weights (statistics only: LPIPS on random weights
would mean nothing). Writes bench/results/capture_schedule.json.

    python bench/capture_schedule.py [--height 240 --width 416 --frames 21] [--prompts 2] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import Stopwatch, add_note_argument, print_table, write_results
from omegaconf import OmegaConf


def group_stats(pipe, capture, device):
    from vqx.calib.stats import GroupStats
    from vqx.models.wan.layers import input_groups

    tr = pipe.transformer
    stats, hooks = {}, []
    for i, block in enumerate(tr.blocks):
        for g in input_groups(False):
            lin = block.get_submodule(g.linears[0])
            st = stats[(i, g.name)] = GroupStats(lin.in_features, 1, None, False, seed=0, device=device)
            hooks.append(lin.register_forward_pre_hook(lambda m, a, st=st: st.update(a[0])))
    with torch.no_grad():
        for call in capture.calls:
            tr(**{k: v.to(device) for k, v in call.items()}, return_dict=False)
    for h in hooks:
        h.remove()
    return stats


def compare(a, b):
    from vqx.algorithms.smoothquant import smoothquant_scale

    rows = []
    for key in a:
        sa, sb = a[key], b[key]
        rel_absmax = ((sa.absmax - sb.absmax).abs() / sb.absmax.clamp(min=1e-6)).median().item()
        rel_mean = ((sa.mean_abs - sb.mean_abs).abs() / sb.mean_abs.clamp(min=1e-6)).median().item()
        w = torch.ones_like(sa.absmax)  # same weights on both sides: compare the activation part of s
        s_a, s_b = smoothquant_scale(sa.absmax, w, 0.75), smoothquant_scale(sb.absmax, w, 0.75)
        rel_s = ((s_a - s_b).abs() / s_b).max().item()
        rows.append({"block": key[0], "group": key[1], "absmax_median_rel_diff": rel_absmax,
                     "mean_abs_median_rel_diff": rel_mean, "sq_scale_max_rel_diff": rel_s,
                     "absmax_ratio_cheap_over_full": (sa.absmax.max() / sb.absmax.max()).item()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--cheap-steps", type=int, default=10)
    ap.add_argument("--full-steps", type=int, default=50)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="capture_schedule.json", help="results file under bench/results/")
    add_note_argument(ap)
    args = ap.parse_args()
    from vqx.cache import DiskCache
    from vqx.calib.capture import load_or_capture
    from vqx.models.wan.synthetic import build_synthetic_pipeline

    if args.smoke:
        args.height, args.width, args.frames, args.prompts, args.cheap_steps, args.full_steps = 32, 32, 5, 1, 2, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build_synthetic_pipeline("1.3B", torch.bfloat16, device, num_layers=2 if args.smoke else None)
    base = dict(path=None, num_prompts=args.prompts, capture_steps=None, height=args.height, width=args.width,
                num_frames=args.frames, guidance=5.0, shift=3.0, negative_prompt="")
    out, timing = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for name, steps in (("cheap", args.cheap_steps), ("full", args.full_steps)):
            with Stopwatch() as sw:
                cap = load_or_capture(pipe, OmegaConf.create({**base, "steps": steps}), "t2v", {"arch": "1.3B"}, DiskCache(d))
            timing[f"{name}_capture_s"] = sw.seconds
            timing[f"{name}_calls"] = len(cap.calls)
            out[name] = group_stats(pipe, cap, device)
    rows = compare(out["cheap"], out["full"])
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    summary = [{"group": g, "absmax_median_rel_diff": sum(r["absmax_median_rel_diff"] for r in rs) / len(rs),
                "mean_abs_median_rel_diff": sum(r["mean_abs_median_rel_diff"] for r in rs) / len(rs),
                "sq_scale_max_rel_diff": max(r["sq_scale_max_rel_diff"] for r in rs)} for g, rs in by_group.items()]
    print_table(summary, list(summary[0]))
    print(timing)
    if not args.smoke:
        print("wrote", write_results(args.out, rows, note=args.note, extra={
            "summary_by_group": summary, "timing": timing,
            "settings": {"resolution": f"{args.width}x{args.height}x{args.frames}", "prompts": args.prompts,
                         "cheap_steps": args.cheap_steps, "full_steps": args.full_steps}}))


if __name__ == "__main__":
    main()
