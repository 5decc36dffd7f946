"""What quantized attention costs on wan_mini's videos: every attention mode alone and with quantized linears.

Grid: outlier setting (none; 8 injected outlier channels at the default sites) x linear format (none, w8a8, fp8,
nvfp4; algorithm=smoothquant, alpha=auto, for the linears; rtn for format=none, which quantizes nothing) x attention
(none, sage1, sage2, fp8, nvfp4), plus attention-only points with ``attention.full_precision_steps=[first,last]``
(SageAttention3's advice: the first and last denoising steps in 16 bits). Each point: mean LPIPS / PSNR / SSIM over
wan_mini's eval prompts against the 16-bit model, the noise floor, and the paired differences per video to the same
format with attention=none (what the attention adds). Points run as in bench/wan_mini_algorithms.py (worker
processes sharing one cache_dir; results rewritten after every point).

    python bench/wan_mini_attention.py --jobs 8 --note "..."             # the grid on a GPU
    python bench/wan_mini_attention.py --jobs 10 --samples 32 --note "..."  # 32 prompts: intervals over prompts
    python bench/wan_mini_attention.py --smoke --note "script check"     # wan_tiny on CPU, 4 points, 2 videos
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_results
from wan_mini_algorithms import OUTLIERS, _worker, eval_prompt_file

from vqx.eval.paired import clustered_interval, format_interval

FORMATS = ("none", "w8a8", "fp8", "nvfp4")
ATTENTION = ("none", "sage1", "sage2", "fp8", "nvfp4")
FIRST_LAST = "attention.full_precision_steps=[first,last]"
EXTRA = {"sage2+16bit_first_last": ["attention=sage2", FIRST_LAST],  # attention-only points (format none)
         "nvfp4+16bit_first_last": ["attention=nvfp4", FIRST_LAST]}


def point_overrides(fmt: str, attention: str, outliers: str) -> list[str]:
    algorithm = ["algorithm=rtn"] if fmt == "none" else ["algorithm=smoothquant"]
    attn = EXTRA.get(attention, [f"attention={attention}"])
    return [*algorithm, f"format={fmt}", *attn, *OUTLIERS[outliers]]


def paired(row: dict, base: dict | None, against: str = "no_attention") -> dict:
    """Per video: this point minus ``base`` (the same format without quantized attention, or for the points with
    16-bit first and last steps the same mode at every step): mean dPSNR / dLPIPS with their 95% intervals over
    prompts (vqx.eval.paired; None with one prompt), the worst video's dPSNR."""
    if base is None or row is base:
        return {}
    by_index = {v["index"]: v for v in base["videos"]}
    d_psnr = [v["psnr"] - by_index[v["index"]]["psnr"] for v in row["videos"]]
    d_lpips = [v["lpips"] - by_index[v["index"]]["lpips"] for v in row["videos"]]
    prompts = [v["prompt"] for v in row["videos"]]
    return {f"d_psnr_vs_{against}_mean": statistics.fmean(d_psnr), f"d_psnr_vs_{against}_min": min(d_psnr),
            f"d_psnr_vs_{against}_ci95_prompts": clustered_interval(d_psnr, prompts)["interval"],
            f"d_lpips_vs_{against}_mean": statistics.fmean(d_lpips),
            f"d_lpips_vs_{against}_ci95_prompts": clustered_interval(d_lpips, prompts)["interval"]}


def _paired_cell(r: dict, against: str) -> str:
    if f"d_psnr_vs_{against}_mean" not in r:
        return ""
    return "; ".join(format_interval(r[f"d_{metric}_vs_{against}_mean"], r[f"d_{metric}_vs_{against}_ci95_prompts"],
                                     digits) for metric, digits in (("psnr", 2), ("lpips", 4)))


def markdown(rows: list[dict]) -> str:
    ok = [r for r in rows if not r.get("error")]
    modes = list(dict.fromkeys(r["attention"] for r in ok))
    out = ["LPIPS / PSNR dB against the 16-bit model (mean over the videos); rows: linear format, columns: attention.", ""]
    for outliers in dict.fromkeys(r["outliers"] for r in ok):
        group = {(r["format"], r["attention"]): r for r in ok if r["outliers"] == outliers}
        out += [f"outliers: {outliers}", "", "| format | " + " | ".join(f"attention={m}" for m in modes) + " |",
                "|---|" + "---|" * len(modes)]
        for fmt in dict.fromkeys(f for f, _ in group):
            cells = [f"{group[(fmt, m)]['lpips']:.4f} / {group[(fmt, m)]['psnr']:.2f}" if (fmt, m) in group else ""
                     for m in modes]
            out.append(f"| {fmt} | " + " | ".join(cells) + " |")
        floor = next(iter(group.values()))["noise_floor"]
        out += ["", f"noise floor: LPIPS {floor['lpips']:.4f} / PSNR {floor['psnr']:.2f} dB", "",
                "What the attention adds: dPSNR; dLPIPS against the same format with attention=none (for the 16-bit "
                "first and last steps: against the same mode at every step), means with 95% intervals over prompts:",
                "", "| format | " + " | ".join(f"attention={m}" for m in modes if m != "none") + " |",
                "|---|" + "---|" * (len(modes) - 1)]
        for fmt in dict.fromkeys(f for f, _ in group):
            cells = [_paired_cell(group[(fmt, m)], "all_steps" if m in EXTRA else "no_attention")
                     if (fmt, m) in group else "" for m in modes if m != "none"]
            out.append(f"| {fmt} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--note", required=True)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--attention", default=",".join([*ATTENTION, *EXTRA]))
    p.add_argument("--outliers", default="none,attention", help=f"comma list of {', '.join(OUTLIERS)}")
    p.add_argument("--samples", type=int, default=8, help="eval prompts: wan_mini's 8, or up to 60 with more of its "
                   "training grammar's (the first 8 are its own)")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="wan_tiny on CPU: 4 points, 2 videos")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="file name under bench/results/ (default wan_mini_attention[_smoke].json)")
    p.add_argument("overrides", nargs="*", help="run.py overrides for every point")
    args = p.parse_args()
    formats, modes, outliers = args.formats.split(","), args.attention.split(","), args.outliers.split(",")
    base = ["model=wan_mini", "export=none", "logger=none", "eval=video", f"eval.num_samples={args.samples}",
            "eval.save_videos=false"]
    if args.smoke:
        formats, modes, outliers = ["none", "w8a8"], ["none", "sage2"], ["none"]
        base = ["model=wan_tiny", "model.device=cpu", "export=none", "logger=none", "eval=video", "eval.num_samples=2",
                "eval.save_videos=false"]
        args.jobs = 1
    args.out = args.out or ("wan_mini_attention_smoke.json" if args.smoke else "wan_mini_attention.json")
    if not 1 <= args.samples <= 60:
        p.error(f"--samples {args.samples}: give 1 to 60 eval prompts (wan_mini's 8, then its grammar's)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vqx_wan_mini_attention_"))
    base += [f"cache_dir={work / 'cache'}", *args.overrides]
    if args.samples > 8 and not args.smoke:
        work.mkdir(parents=True, exist_ok=True)
        prompts = eval_prompt_file(ROOT / "vqx" / "assets" / "wan_mini" / "eval" / "prompts.json", args.samples, 1,
                                 work / "eval_prompts.json")
        base.append(f"eval.path={prompts}")
    points = [((o, f, a), point_overrides(f, a, o)) for o in outliers for f in formats for a in modes
              if f == "none" or a not in EXTRA]
    firsts = {key[0]: (key, ov) for key, ov in reversed(points)}  # references first, one per outlier setting
    order = [firsts[o] for o in outliers] + [pt for pt in points if pt not in firsts.values()]
    shares = [order[k::args.jobs] for k in range(args.jobs)]
    print(f"{len(points)} points on {args.jobs} workers; work dir {work}", flush=True)
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(share, base, str(work), queue)) for share in shares if share]
    for proc in procs:
        proc.start()
    results, rows = {}, []
    for done in range(1, len(points) + 1):
        key, summary, error = queue.get()
        results[key] = (summary, error)
        print(f"{'/'.join(key)}: " + (error or f"PSNR {summary['psnr']:.2f} LPIPS {summary['lpips']:.4f} "
                                      f"({summary['wall_s']} s)"), flush=True)
        rows = []
        for (o, f, a), overrides in points:
            if (o, f, a) not in results:
                continue
            summary, error = results[(o, f, a)]
            row = {"outliers": o, "format": f, "attention": a, "overrides": overrides}
            if error:
                rows.append({**row, "error": error})
                continue
            no_attention = results.get((o, f, "none"), (None, None))[0]
            row.update(summary, **paired(summary, no_attention))
            if a in EXTRA:  # what the 16-bit first and last steps give back
                row.update(paired(summary, results.get((o, f, a.split("+")[0]), (None, None))[0], "all_steps"))
            rows.append(row)
        path = write_results(args.out, rows, {
            "note": args.note, "command": " ".join(sys.argv), "base_overrides": base,
            "points_done": f"{done} of {len(points)}", "wall_s": round(time.perf_counter() - t0, 1),
            "markdown": markdown(rows)})
    for proc in procs:
        proc.join()
    print(markdown(rows))
    print(f"written {path}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
