"""Where a mean loss to RTN comes from: the per-video tail of wan_mini_algorithms.py's 32-video results (issue 17).

Reads result files written by ``bench/wan_mini_algorithms.py --seeds 4`` that share one set of paired videos (the
same prompts, seeds, 16-bit references and RTN point; the script checks RTN's per-video scores agree across files),
and for every non-RTN point reports:

- the worst videos by paired LPIPS difference to RTN, and the share of the point's total difference they carry;
- per prompt (its videos at every seed summed), the prompt that carries the most, and its share;
- the mean paired difference and its bootstrap interval with that prompt left out, and the largest
  leave-one-prompt-out shift of the mean: a sensitivity analysis (how much of a conclusion rests on one prompt),
  not a fix; a prompt is not dropped from any table;
- the correlation of per-video differences between points: whether the variants fail on the same videos.

    python bench/tail_analysis.py --note "..." bench/results/wan_mini_seeds_fp8_ffn_text.json ...
    python bench/tail_analysis.py --note "..." --glob 'wan_mini_*fp8_ffn_text.json' \
        --out wan_mini_tail_fp8_ffn_text.json

CPU only, seconds: it reads JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import RESULTS, add_note_argument, print_table, write_results
from wan_mini_algorithms import bootstrap_ci


def load_points(paths: list[Path]) -> tuple[dict, list[dict]]:
    """RTN's row (checked equal across files) and every other point's row, labelled, first file wins on a repeat."""
    rtn, points, seen = None, [], set()
    for path in paths:
        data = json.loads(path.read_text())
        for row in data["rows"]:
            if row["algorithm"] == "rtn":
                scores = [(v["index"], v["prompt"], round(v["lpips"], 6)) for v in row["videos"]]
                if rtn is None:
                    rtn, rtn_scores, rtn_file = row, scores, path.name
                elif scores != rtn_scores:
                    sys.exit(f"error: {path.name}'s RTN videos differ from {rtn_file}'s: not the same paired set")
                continue
            if "vs_rtn" not in row:
                sys.exit(f"error: {path.name} point {row['algorithm']!r} has no per-video 'vs_rtn' (rescore it first)")
            if row["algorithm"] in seen:
                continue
            seen.add(row["algorithm"])
            points.append({**row, "file": path.name})
    if rtn is None:
        sys.exit("error: no RTN row in " + ", ".join(p.name for p in paths))
    return rtn, points


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else float("nan")


def tail(point: dict, rtn: dict, top: int) -> dict:
    prompts = {v["index"]: v["prompt"] for v in rtn["videos"]}
    floors = {v["index"]: (v["floor_lpips"], v["floor_psnr"]) for v in rtn["videos"]}
    diffs = point["vs_rtn"]
    d_lpips = {d["index"]: d["d_lpips"] for d in diffs}
    d_psnr = {d["index"]: d["d_psnr"] for d in diffs}
    total = sum(d_lpips.values())
    worst = sorted(d_lpips, key=d_lpips.get, reverse=True)[:top]
    by_prompt: dict[str, float] = {}
    for i, d in d_lpips.items():
        by_prompt[prompts[i]] = by_prompt.get(prompts[i], 0.0) + d
    worst_prompt = max(by_prompt, key=by_prompt.get)

    def without(prompt: str) -> dict:
        keep = [i for i in d_lpips if prompts[i] != prompt]
        lp, ps = [d_lpips[i] for i in keep], [d_psnr[i] for i in keep]
        return {"videos": len(keep), "d_lpips_mean": statistics.fmean(lp), "d_lpips_ci95": bootstrap_ci(lp),
                "d_psnr_mean": statistics.fmean(ps), "d_psnr_ci95": bootstrap_ci(ps)}

    mean = statistics.fmean(d_lpips.values())
    loo = {p: statistics.fmean(d for i, d in d_lpips.items() if prompts[i] != p) - mean for p in by_prompt}
    return {
        "point": point["algorithm"], "file": point["file"], "videos": len(diffs),
        "d_lpips_mean": mean, "d_lpips_ci95": point.get("d_lpips_ci95"),
        "d_lpips_median": statistics.median(d_lpips.values()),
        "d_psnr_mean": statistics.fmean(d_psnr.values()),
        "worst_videos": [{"index": i, "prompt": prompts[i], "d_lpips": d_lpips[i], "d_psnr": d_psnr[i],
                          "floor_lpips": floors[i][0], "floor_psnr": floors[i][1]} for i in worst],
        # shares of the summed difference; above 1 when the other videos' differences sum below zero
        f"top{top}_share": sum(d_lpips[i] for i in worst) / total if total > 0 else None,
        "worst_prompt": worst_prompt, "worst_prompt_share": by_prompt[worst_prompt] / total if total > 0 else None,
        "without_worst_prompt": without(worst_prompt),
        "leave_one_prompt_out_max_shift": min(loo.values()),
    }


def main() -> None:
    p = add_note_argument(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("files", nargs="*", type=Path, help="results files of bench/wan_mini_algorithms.py --seeds N")
    p.add_argument("--glob", help="or: every file under bench/results/ matching this pattern")
    p.add_argument("--top", type=int, default=3, help="how many worst videos to list per point (default 3)")
    p.add_argument("--out", default="wan_mini_tail.json", help="results file name under bench/results/")
    args = p.parse_args()
    paths = list(args.files) + (sorted(RESULTS.glob(args.glob)) if args.glob else [])
    paths = [q for q in dict.fromkeys(paths) if q.name != args.out]
    if not paths:
        sys.exit("error: no results files given (pass paths or --glob)")
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        sys.exit(f"error: no such results file: {missing[0]}")
    rtn, points = load_points(paths)
    rows = [tail(pt, rtn, args.top) for pt in points]
    vectors = {pt["algorithm"]: [d["d_lpips"] for d in sorted(pt["vs_rtn"], key=lambda d: d["index"])] for pt in points}
    names = list(vectors)
    correlation = {a: {b: pearson(vectors[a], vectors[b]) for b in names} for a in names}
    prompt_counts: dict[str, int] = {}
    for r in rows:
        prompt_counts[r["worst_prompt"]] = prompt_counts.get(r["worst_prompt"], 0) + 1

    table = [{"point": r["point"], "dLPIPS mean": r["d_lpips_mean"], "median": r["d_lpips_median"],
              f"top{args.top} share": r[f"top{args.top}_share"], "worst prompt share": r["worst_prompt_share"],
              "mean w/o it": r["without_worst_prompt"]["d_lpips_mean"],
              "dPSNR w/o it": r["without_worst_prompt"]["d_psnr_mean"],
              "worst video": r["worst_videos"][0]["index"]} for r in rows]
    for t in table:
        for k in ("dLPIPS mean", "median", "mean w/o it"):
            t[k] = f"{t[k]:+.4f}"
        t["dPSNR w/o it"] = f"{t['dPSNR w/o it']:+.2f}"
    print_table(table, list(table[0]))
    print("worst prompt per point:", json.dumps(prompt_counts))
    print("correlation of per-video dLPIPS:")
    print_table([{"": a, **{b: f"{correlation[a][b]:+.2f}" for b in names}} for a in names], ["", *names])
    out = write_results(args.out, rows, {"sources": [q.name for q in paths], "worst_prompt_counts": prompt_counts,
                                         "correlation_d_lpips": correlation}, note=args.note)
    print(f"written {out}")


if __name__ == "__main__":
    main()
