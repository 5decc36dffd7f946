"""Each job of a sweep against round-to-nearest on the same videos: paired per video, with intervals over prompts.

A job's RTN counterpart is the complete job whose overrides are the same but for the algorithm's (``algorithm`` and
``algorithm.*``): same model, format, attention, outliers and eval samples. Their videos pair by prompt and seed
(the 16-bit references are the same videos), and the mean differences carry a 95% interval over prompts
(vqx.eval.paired): a prompt's seeds share its error, so they count once.
"""

from __future__ import annotations

from ..eval.paired import clustered_interval
from .compare import Job

BASELINE = "rtn"


def _key_overrides(job: Job) -> dict[str, str]:
    """The overrides that must match for two jobs to be compared: all but the algorithm's."""
    return {k: v for k, v in job.overrides.items()
            if k.lstrip("+~").split(".")[0] != "algorithm"}


def _videos(job: Job) -> dict[tuple, dict]:
    """(prompt, seed) -> the video's scores, for videos with LPIPS and PSNR."""
    out = {}
    for v in (job.metrics or {}).get("videos") or []:
        if isinstance(v, dict) and isinstance(v.get("lpips"), (int, float)) and isinstance(v.get("psnr"), (int, float)):
            out[(v.get("prompt"), v.get("seed"))] = v
    return out


def verdict(d_psnr: dict, d_lpips: dict) -> str:
    """"worse" if either interval lies on the losing side of 0 (also where the other lies on the winning side),
    "better" if one lies on the winning side and the other contains 0, "within noise" if both contain 0; "one
    prompt" without intervals."""
    if d_psnr["interval"] is None or d_lpips["interval"] is None:
        return "one prompt"
    psnr_lo, psnr_hi = d_psnr["interval"]
    lpips_lo, lpips_hi = d_lpips["interval"]
    if psnr_hi < 0 or lpips_lo > 0:
        return "worse"
    if psnr_lo > 0 or lpips_hi < 0:
        return "better"
    return "within noise"


def paired_vs_rtn(complete: list[Job]) -> list[dict]:
    """One row per non-RTN job with an RTN counterpart that scored the same videos: the mean paired PSNR and LPIPS
    differences (job minus RTN) with their intervals over prompts, the counts, and the `verdict`."""
    rtn = [j for j in complete if j.algorithm == BASELINE]
    rows = []
    for job in complete:
        if job.algorithm == BASELINE:
            continue
        # an RTN job of the same multirun first, where several DIRs hold one with the same overrides
        base = next((r for r in sorted(rtn, key=lambda r: r.dir.parent != job.dir.parent)
                     if _key_overrides(r) == _key_overrides(job) and r.model == job.model
                     and r.format == job.format), None)
        if base is None:
            continue
        ours, theirs = _videos(job), _videos(base)
        if not ours or set(ours) != set(theirs):
            continue
        keys = sorted(ours, key=lambda k: (str(k[0]), str(k[1])))
        prompts = [k[0] for k in keys]
        d_psnr = clustered_interval([ours[k]["psnr"] - theirs[k]["psnr"] for k in keys], prompts)
        d_lpips = clustered_interval([ours[k]["lpips"] - theirs[k]["lpips"] for k in keys], prompts)
        worst = min(ours[k]["psnr"] - theirs[k]["psnr"] for k in keys)
        rows.append({"job": job, "rtn": base, "d_psnr": d_psnr, "d_lpips": d_lpips, "worst_d_psnr": worst,
                     "prompts": d_psnr["clusters"], "videos": len(keys), "verdict": verdict(d_psnr, d_lpips)})
    return rows
