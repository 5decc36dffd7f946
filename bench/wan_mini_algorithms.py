"""Every algorithm x format x outlier setting on wan_mini's eval prompts, per video, paired against RTN.

One call produces the README's wan_mini table (issue 17): for each point its mean LPIPS / PSNR / SSIM over the
videos, and per video the paired difference to RTN of the same format and outlier setting (the same prompt,
seed and 16-bit reference), next to that video's noise floor (the reference against a second 16-bit run). A
video counts as worse than RTN when its LPIPS exceeds RTN's by more than its own noise-floor LPIPS.

    python bench/wan_mini_algorithms.py --note "..."                        # the whole grid on the GPU (--jobs 4)
    python bench/wan_mini_algorithms.py --smoke --note "script check"      # wan_tiny on CPU, 2 points, 2 videos
    python bench/wan_mini_algorithms.py --algorithms rtn,smoothquant --formats w8a8 --outliers none --note "..."
    python bench/wan_mini_algorithms.py --seeds 4 --formats fp8 --note "..."  # 8 prompts x 4 noise seeds: 32 videos
    python bench/wan_mini_algorithms.py --samples 32 --note "..."  # 32 prompts of wan_mini's grammar, 1 seed each
    python bench/wan_mini_algorithms.py --algorithms rtn,smoothquant,smoothquant_calib_b,smoothquant_calib_c \
        --formats fp8 --note "..."       # one search, three calibration prompt sets: the spread between draws
    python bench/wan_mini_algorithms.py --note "..." --rescore wan_mini_seeds_fp8_ffn_text.json  # statistics only

Points run in-process, spread over ``--jobs`` worker processes that share one cache_dir (capture, float-model
statistics, 16-bit references and noise floors are built once per outlier setting). Writes
bench/results/<--out> (rows: one per point, with per-video scores; "markdown": the tables) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_results

from vqx.eval.paired import cluster_effect, clustered_interval
from vqx.io import write_json_atomic

ALGORITHMS = {  # label -> run.py overrides
    "rtn": ["algorithm=rtn"],
    "smoothquant": ["algorithm=smoothquant"],  # the default: alpha=auto (identity among the candidates)
    # the search at its most literal: every alpha of the grid scored on the block over every calibration call
    "smoothquant_full_search": ["algorithm=smoothquant", "algorithm.shortlist=0", "calib.search_calls=null"],
    "smoothquant_0.75": ["algorithm=smoothquant", "algorithm.alpha=0.75"],  # the old default, fixed
    "smoothquant_0.5": ["algorithm=smoothquant", "algorithm.alpha=0.5"],
    "awq": ["algorithm=awq"],
    "gptq": ["algorithm=gptq"],
    "smoothquant_gptq": ["algorithm=smoothquant_gptq"],
    "awq_gptq": ["algorithm=awq_gptq"],
}
# a transform must earn its keep: a group's candidate only if it lowers the block error by more than 2 % / 5 %
MIN_GAIN = {f"{name}_mg{pct:02d}": [*ALGORITHMS[name], f"algorithm.min_gain={pct / 100}"]
            for name in ("smoothquant", "smoothquant_gptq", "awq") for pct in (2, 5)}
# a transform's decrease must be consistent over the search terms: paired t above 1 / 2 (0: no bar, the default; a
# label of its own for results files measured while smoothquant's default was min_t=2, git 2112a75)
MIN_T = {f"{name}_t{t}": [*ALGORITHMS[name], f"algorithm.min_t={t}"]
         for name in ("smoothquant", "smoothquant_gptq", "awq") for t in (0, 1, 2)}
# issue 17's causes of the gap to LLMC at equal alpha (not in the default grid; name them in --algorithms):
# LLMC smooths the modulated-norm inputs and the cross-attention query only, never the attention outputs.
LLMC_SITES = "[self_attn_in,cross_attn_q,ffn_in]"
CAUSES = {
    "smoothquant_0.75_llmc_sites": ["algorithm=smoothquant", "algorithm.alpha=0.75", f"algorithm.groups={LLMC_SITES}"],
    "smoothquant_0.75_no_self_attn_out": ["algorithm=smoothquant", "algorithm.alpha=0.75",
                                          "algorithm.groups=[self_attn_in,cross_attn_q,cross_attn_out,ffn_in]"],
    "smoothquant_0.75_no_cross_attn_out": ["algorithm=smoothquant", "algorithm.alpha=0.75",
                                           "algorithm.groups=[self_attn_in,self_attn_out,cross_attn_q,ffn_in]"],
    # the statistics' time window: only the early (noisiest) or the late denoising steps of the capture
    "smoothquant_0.75_early_steps": ["algorithm=smoothquant", "algorithm.alpha=0.75", "calib.capture_window=[0,0.3]"],
    "smoothquant_0.75_late_steps": ["algorithm=smoothquant", "algorithm.alpha=0.75", "calib.capture_window=[0.7,1]"],
    "smoothquant_early_steps": ["algorithm=smoothquant", "calib.capture_window=[0,0.3]"],  # the searched default
}
# the block error of the guided prediction (g * cond + (1 - g) * uncond per prompt and step) instead of each branch's
GUIDED = {f"{name}_guided": [*ALGORITHMS[name], "calib.block_objective=guided"]
          for name in ("smoothquant", "smoothquant_gptq", "awq")}
# the spread between equally good quantizations: the searched SmoothQuant calibrated on other prompts of the
# calibration set (label -> index of its first prompt; the run takes calib.num_prompts from there)
CALIB_DRAWS = {"smoothquant_calib_b": 3, "smoothquant_calib_c": 6}
# more calibration prompts (wan_mini's default is 3 of its 32): statistics and search calls over 12 prompts, the
# search still scoring calib.search_calls=16 calls, now spread over 4x as many prompts
MORE_PROMPTS = {f"{name}_p12": [*ALGORITHMS[name], "calib.num_prompts=12"]
                for name in ("smoothquant", "smoothquant_gptq", "awq", "gptq")}
OUTLIERS = {  # label -> run.py overrides (8 of 256 channels 32x larger, the float model unchanged bit for bit)
    "none": [],
    "attention": ["model.outliers.channels=8"],  # the default sites: attn2.to_q, attn1/attn2.to_out.0 inputs
    "ffn_text": ["model.outliers.channels=8", "model.outliers.sites=[ffn_out,cross_attn_text]"],
}
FORMATS = ["w8a8", "fp8"]
NAMED = {**ALGORITHMS, **CAUSES, **MIN_GAIN, **MIN_T, **GUIDED, **MORE_PROMPTS}  # every point but the calibration draws


def _point_overrides(algorithm: str, fmt: str, outliers: str, draws: dict[str, list[str]]) -> list[str]:
    return [*{**NAMED, **draws}[algorithm], f"format={fmt}", *OUTLIERS[outliers]]


def _worker(jobs: list[tuple], base: list[str], work: str, queue) -> None:
    """Run the points in ``jobs`` one after another in this process; put each one's summary on ``queue``."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    import vqx.plugins  # noqa: F401
    from vqx import experiment

    for key, overrides in jobs:
        t0 = time.perf_counter()
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="config", overrides=[*base, *overrides])
            m = experiment.run(cfg, Path(work) / "runs" / "-".join(key))
            queue.put((key, _summary(m, time.perf_counter() - t0), None))
        except Exception as e:  # a failed point is reported, the others go on
            queue.put((key, None, f"{type(e).__name__}: {e}"))


def _summary(m: dict, wall_s: float) -> dict:
    videos = [{"index": v["index"], "prompt": v["prompt"], "lpips": v["lpips"], "psnr": v["psnr"], "ssim": v["ssim"],
               "floor_lpips": (v.get("noise_floor") or {}).get("lpips"), "floor_psnr": (v.get("noise_floor") or {}).get("psnr")}
              for v in m["videos"]]
    blocks = m.get("blocks") or []
    return {"lpips": m["lpips"], "psnr": m["psnr"], "ssim": m["ssim"], "videos": videos,
            "noise_floor": {k: m["noise_floor"].get(k) for k in ("lpips", "psnr", "ssim")},
            "layer_error_mean": (m.get("layer_error") or {}).get("mean"),
            "block_error": [b["error"] for b in blocks], "block_error_rtn": [b["error_rtn"] for b in blocks],
            "block_fallbacks": sum(b["fallback"] for b in blocks),
            "groups_identity": sum(1 for g in m["groups"] if g.get("alpha", 1) is None or g.get("ratio", 1) == 0.0),
            "groups": len(m["groups"]), "gain_t": [g.get("gain_t") for g in m["groups"]],
            "quantize_s": m["timings"].get("quantize_s"), "wall_s": round(wall_s, 1)}


def _paired(row: dict, rtn: dict | None) -> dict:
    """Per video: this point minus RTN (PSNR dB, LPIPS), and whether it is worse than RTN beyond the noise floor."""
    if rtn is None:
        return {}
    by_index = {v["index"]: v for v in rtn["videos"]}
    diffs = []
    for v in row["videos"]:
        r = by_index[v["index"]]
        d_lpips = v["lpips"] - r["lpips"]
        floor = v["floor_lpips"]
        diffs.append({"index": v["index"], "d_psnr": v["psnr"] - r["psnr"], "d_lpips": d_lpips,
                      "worse_beyond_floor": floor is not None and d_lpips > floor})
    d_psnr, d_lpips = [d["d_psnr"] for d in diffs], [d["d_lpips"] for d in diffs]
    prompts = [v["prompt"] for v in row["videos"]]
    # LPIPS differences are heavy-tailed (a few videos whose trajectory went elsewhere carry the mean): the median
    # next to the mean's interval says whether a mean loss is typical or a tail. Two intervals: over prompts (a
    # prompt's seeds share its text's quantization error, so the prompt is the unit of replication) and, as the
    # files before it had, a bootstrap over videos that takes every video as independent
    return {"vs_rtn": diffs, "d_psnr_mean": statistics.fmean(d_psnr), "d_psnr_min": min(d_psnr),
            "d_psnr_ci95": bootstrap_ci(d_psnr),
            "d_psnr_ci95_prompts": clustered_interval(d_psnr, prompts)["interval"],
            "d_lpips_mean": statistics.fmean(d_lpips), "d_lpips_ci95": bootstrap_ci(d_lpips),
            "d_lpips_ci95_prompts": clustered_interval(d_lpips, prompts)["interval"],
            "d_lpips_median": statistics.median(d_lpips), "prompts": len(set(prompts)),
            # do a prompt's seeds share its difference? (None with one seed per prompt)
            "prompt_effect_psnr": cluster_effect(d_psnr, prompts), "prompt_effect_lpips": cluster_effect(d_lpips, prompts),
            "videos_worse_beyond_floor": sum(d["worse_beyond_floor"] for d in diffs)}


def bootstrap_ci(values: list[float], resamples: int = 10000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (paired per-video differences), every video taken
    as independent: too narrow where a prompt has several seeds (`vqx.eval.paired`). Seeded, so the file is
    reproducible."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    return [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]]


def eval_prompt_file(source: Path, samples: int, seeds: int, dest: Path) -> Path:
    """An eval prompts file at ``dest``: ``source``'s first ``samples`` prompts, each at ``seeds`` noise seeds (its
    own first, then +10000, +20000, ...; the file's first ``samples`` entries are the usual videos): more paired
    videos of the same prompts. Past the file's own prompts (wan_mini has 8) come more of the training grammar's
    eval prompts (`eval_prompts`, seeds 1000 + i as the file's; none is a calibration prompt): more prompts, for a
    tighter interval over prompts."""
    from vqx.testbed.data import eval_prompts

    data = json.loads(source.read_text())
    own = data["samples"][:samples]
    if samples > len(own):
        grammar = [{"prompt": p, "seed": 1000 + i} for i, p in enumerate(eval_prompts(samples))]
        if own != grammar[:len(own)]:
            raise ValueError(f"{source}'s prompts are not the grammar's first {len(own)}: cannot extend them")
        calib = json.loads((source.parent.parent / "calib" / "prompts.json").read_text())["samples"]
        if {s["prompt"] for s in calib} & {s["prompt"] for s in grammar}:
            raise ValueError(f"an added eval prompt is a calibration prompt of {source.parent.parent}")
        own = grammar
        data["description"] = f"{data.get('description', '')}; the grammar's first {samples} eval prompts"
    data["samples"] = [{**s, "seed": s["seed"] + 10000 * j} for j in range(seeds) for s in own]
    if seeds > 1:
        data["description"] = f"{data.get('description', '')}; every prompt at {seeds} seeds"
    write_json_atomic(dest, data)
    return dest


def calib_subset(source: Path, start: int, dest: Path) -> Path:
    """``source``'s calibration prompts from index ``start`` on (then the ones before it): a run that takes the
    first calib.num_prompts calibrates on other prompts of the same kind."""
    data = json.loads(source.read_text())
    samples = data["samples"]
    if not 0 <= start < len(samples):
        raise ValueError(f"calibration prompt {start}: {source} has {len(samples)}")
    data["samples"] = samples[start:] + samples[:start]
    data["description"] = f"{data.get('description', '')}; from prompt {start} on"
    write_json_atomic(dest, data)
    return dest


def _rows(points: list[tuple], results: dict) -> list[dict]:
    """One row per point measured so far, in grid order, with its paired differences to RTN."""
    rows = []
    for (o, f, a), overrides in points:
        if (o, f, a) not in results:
            continue
        summary, error = results[(o, f, a)]
        row = {"outliers": o, "format": f, "algorithm": a, "overrides": overrides}
        if error:
            rows.append({**row, "error": error})
            continue
        rtn = results.get((o, f, "rtn"), (None, None))[0]
        rows.append({**row, **summary, **_paired(summary, rtn if a != "rtn" else summary)})
    return rows


def _markdown(rows: list[dict]) -> str:
    out = ["| outliers | format | algorithm | LPIPS | PSNR dB | SSIM | dPSNR vs RTN: mean [95% interval over prompts] "
           "{over videos} / worst video | dLPIPS vs RTN: mean [over prompts] {over videos} / median | "
           "videos worse than RTN beyond the floor | block fallbacks |",
           "|---|---|---|---|---|---|---|---|---|---|"]

    def interval(r: dict, key: str, fmt: str) -> str:
        prompts, videos = r.get(f"{key}_ci95_prompts"), r[f"{key}_ci95"]
        return ((f"[{prompts[0]:{fmt}}, {prompts[1]:{fmt}}] " if prompts else "") +
                f"{{{videos[0]:{fmt}}, {videos[1]:{fmt}}}}")

    for r in rows:
        if r.get("error"):
            out.append(f"| {r['outliers']} | {r['format']} | {r['algorithm']} | failed: {r['error'][:80]} ||||||| ")
            continue
        paired = (f"{r['d_psnr_mean']:+.2f} {interval(r, 'd_psnr', '+.2f')} / {r['d_psnr_min']:+.2f}"
                  if "d_psnr_mean" in r else "-")
        lpips = (f"{r['d_lpips_mean']:+.4f} {interval(r, 'd_lpips', '+.4f')} / {r['d_lpips_median']:+.4f}"
                 if "d_lpips_ci95" in r else "-")
        worse = f"{r['videos_worse_beyond_floor']} of {len(r['videos'])}" if "d_psnr_mean" in r else "-"
        out.append(f"| {r['outliers']} | {r['format']} | {r['algorithm']} | {r['lpips']:.4f} | {r['psnr']:.2f} | "
                   f"{r['ssim']:.4f} | {paired} | {lpips} | {worse} | {r['block_fallbacks']} |")
    floors = {r["outliers"]: r["noise_floor"] for r in rows if not r.get("error")}
    for name, f in floors.items():
        out.append(f"| {name} | noise floor | | {f['lpips']:.4f} | {f['psnr']:.2f} | {f['ssim']:.4f} | | | | |")
    out += ["", "Per video, PSNR dB (paired difference to RTN in brackets; noise-floor PSNR in the header):", ""]
    ok = [r for r in rows if not r.get("error")]
    if ok:
        n = len(ok[0]["videos"])
        for outliers in dict.fromkeys(r["outliers"] for r in ok):
            group = [r for r in ok if r["outliers"] == outliers]
            floor = [v["floor_psnr"] for v in group[0]["videos"]]
            out.append(f"| {outliers} | format | algorithm | " + " | ".join(
                f"v{i} (floor {f:.1f})" if f is not None else f"v{i}" for i, f in enumerate(floor[:n])) + " |")
            out.append("|---|---|---|" + "---|" * n)
            for r in group:
                cells = []
                for k, v in enumerate(r["videos"]):
                    d = r["vs_rtn"][k]["d_psnr"] if "vs_rtn" in r else None
                    cells.append(f"{v['psnr']:.2f}" + (f" ({d:+.2f})" if d is not None and r["algorithm"] != "rtn" else ""))
                out.append(f"| | {r['format']} | {r['algorithm']} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def rescore(name: str, command: str, note: str) -> Path:
    """Recompute the paired statistics and the tables of a results file this script wrote, from its per-video scores
    (nothing is rerun): files written before a statistic existed get it. The measurement's environment stays; each
    rescoring's is appended to "rescored"."""
    from common import RESULTS, environment

    path = Path(name) if Path(name).is_absolute() else RESULTS / name
    data = json.loads(path.read_text())
    rows = data["rows"]
    rtn = {(r["outliers"], r["format"]): r for r in rows if r.get("algorithm") == "rtn" and not r.get("error")}
    for r in rows:
        if not r.get("error") and (r["outliers"], r["format"]) in rtn:
            r.update(_paired(r, rtn[(r["outliers"], r["format"])]))
    data["markdown"] = _markdown(rows)
    earlier = data.get("rescored") or []
    data["rescored"] = [*([earlier] if isinstance(earlier, dict) else earlier),
                        {"note": note, "command": command, "environment": environment()}]
    write_json_atomic(path, data)
    print(data["markdown"])
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--note", required=True, help="what this measurement is for (stored in the results)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help=f"comma list of {', '.join(ALGORITHMS)} (default: all of those), {', '.join(CAUSES)}, "
                        f"{', '.join(MIN_GAIN)}, {', '.join(MIN_T)}, {', '.join(GUIDED)}, {', '.join(CALIB_DRAWS)}")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--outliers", default=",".join(OUTLIERS), help=f"comma list of {', '.join(OUTLIERS)}")
    p.add_argument("--samples", type=int, default=8, help="eval prompts: wan_mini's 8, or up to 60 with more "
                   "of its training grammar's (the first 8 are its own)")
    p.add_argument("--seeds", type=int, default=1, help="noise seeds per eval prompt (videos: samples x seeds)")
    p.add_argument("--jobs", type=int, default=4, help="worker processes sharing the device and the cache")
    p.add_argument("--smoke", action="store_true", help="wan_tiny on CPU, rtn and smoothquant, w8a8, 2 videos")
    p.add_argument("--workdir", default=None, help="run dirs and cache (default: a temporary folder)")
    p.add_argument("--out", default="wan_mini_algorithms.json", help="file name under bench/results/")
    p.add_argument("--rescore", metavar="FILE", help="recompute a results file's paired statistics from its per-video "
                   "scores (under bench/results/), rerunning nothing")
    p.add_argument("overrides", nargs="*", help="run.py overrides for every point (e.g. calib.search_calls=null)")
    args = p.parse_args()
    if args.rescore:
        print(f"written {rescore(args.rescore, ' '.join(sys.argv), args.note)}")
        return 0

    algorithms, formats, outliers = args.algorithms.split(","), args.formats.split(","), args.outliers.split(",")
    base = ["model=wan_mini", "export=none", "logger=none", "eval=video", f"eval.num_samples={args.samples}",
            "eval.save_videos=false"]
    if args.smoke:
        algorithms, formats, outliers = ["rtn", "smoothquant"], ["w8a8"], ["none", "attention"]
        base = ["model=wan_tiny", "model.device=cpu", "export=none", "logger=none", "eval=video", "eval.num_samples=2",
                "eval.save_videos=false"]
        args.jobs, args.samples = 1, 2
    for name, valid in ((algorithms, {**NAMED, **CALIB_DRAWS}), (outliers, OUTLIERS)):
        bad = [x for x in name if x not in valid]
        if bad:
            p.error(f"unknown {bad[0]!r}; valid: {', '.join(valid)}")
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: give 1 or more noise seeds per prompt")
    if not 1 <= args.samples <= 60:
        p.error(f"--samples {args.samples}: give 1 to 60 eval prompts (wan_mini's 8, then its grammar's)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vqx_wan_mini_algorithms_"))
    base += [f"cache_dir={work / 'cache'}", *args.overrides]
    assets = ROOT / "vqx" / "assets" / ("wan_t2v" if args.smoke else "wan_mini")
    if args.seeds > 1 or args.samples > 8:
        work.mkdir(parents=True, exist_ok=True)
        prompts = eval_prompt_file(assets / "eval" / "prompts.json", args.samples, args.seeds, work / "eval_prompts.json")
        base += [f"eval.path={prompts}", f"eval.num_samples={args.samples * args.seeds}"]

    draws = {}
    for name in (a for a in algorithms if a in CALIB_DRAWS):
        work.mkdir(parents=True, exist_ok=True)
        path = calib_subset(assets / "calib" / "prompts.json", CALIB_DRAWS[name], work / f"calib_{name}.json")
        draws[name] = ["algorithm=smoothquant", f"calib.path={path}"]
    points = [((o, f, a), _point_overrides(a, f, o, draws)) for o in outliers for f in formats for a in algorithms]
    # the first point of each outlier setting builds its references: run those first, one per worker
    firsts = {key[0]: (key, ov) for key, ov in reversed(points)}
    order = [firsts[o] for o in outliers] + [pt for pt in points if pt not in firsts.values()]
    shares = [order[k::args.jobs] for k in range(args.jobs)]
    print(f"{len(points)} points on {args.jobs} workers; work dir {work}", flush=True)
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(share, base, str(work), queue)) for share in shares if share]
    for proc in procs:
        proc.start()
    results = {}
    for done in range(1, len(points) + 1):
        key, summary, error = queue.get()
        results[key] = (summary, error)
        print(f"{'/'.join(key)}: " + (error or f"PSNR {summary['psnr']:.2f} LPIPS {summary['lpips']:.4f} "
                                      f"({summary['wall_s']} s)"), flush=True)
        # rewritten after every point, so a run cut short (a time limit) still leaves what it measured
        rows = _rows(points, results)
        markdown = _markdown(rows)
        path = write_results(args.out, rows, {
            "note": args.note, "command": " ".join(sys.argv), "base_overrides": base,
            "points_done": f"{done} of {len(points)}", "wall_s": round(time.perf_counter() - t0, 1),
            "markdown": markdown, "worse_than_rtn": "a video's LPIPS above RTN's by more than its noise-floor LPIPS"})
    for proc in procs:
        proc.join()
    print(markdown)
    print(f"written {path}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
