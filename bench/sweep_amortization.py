"""What a 6-point sweep costs against 6 independent runs.

The sweep is one `python run.py -m ...` whose jobs share one cache_dir (calibration capture and 16-bit
reference videos are built by the first job and read by the others); each independent run is its own
`python run.py ...` with its own empty cache_dir. Reports wall times, the ratio, the per-stage split and
whether both give the same results. Writes bench/results/sweep_amortization.json.

    python bench/sweep_amortization.py --smoke                     # CPU, wan_tiny, eval=video
    python bench/sweep_amortization.py --model wan2.1_t2v_1.3b model.path=/data/Wan2.1-T2V-1.3B-Diffusers eval=video
    python bench/sweep_amortization.py --model wan_tiny calib.num_prompts=2   # any run.py overrides after the options

Sweeps SmoothQuant's alpha (0.4 ... 0.9) when conf/algorithm/smoothquant.yaml exists, else RTN over six formats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_note_argument, print_table, write_results

ALPHAS = ["0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
FORMATS = ["w8a8", "fp8", "w8a16", "fp8_w", "fp_e3m4", "fp_e2m5"]
STAGES = ("load_s", "reference_s", "calibrate_s", "quantize_s", "export_s", "eval_s")


def sweep_axis() -> tuple[str, list[str], str, list[str], str]:
    """(name, fixed overrides, swept key, values, note)."""
    if (ROOT / "conf" / "algorithm" / "smoothquant.yaml").is_file():
        return "alpha", ["algorithm=smoothquant"], "algorithm.alpha", ALPHAS, "SmoothQuant alpha sweep"
    return ("format", ["algorithm=rtn"], "format", FORMATS,
            "conf/algorithm/smoothquant.yaml not found: RTN over six formats instead of an alpha sweep")


def run_py(args: list[str], log: Path) -> float:
    """Wall seconds of `python run.py ARGS` (process start included, as a user pays it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0 or "failed:" in r.stderr:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        sys.exit(f"sweep_amortization: `run.py {' '.join(args)}` failed: {lines[-1] if lines else r.returncode} (log: {log})")
    return seconds


def job_row(run_dir: Path, key: str) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    cfg_value = _lookup_yaml(run_dir / "config.yaml", key)
    refs = ((m.get("eval") or {}).get("reference_cache") or {}) if isinstance(m.get("eval"), dict) else {}
    return {"value": str(cfg_value), **{s: (m.get("timings") or {}).get(s) for s in (*STAGES, "total_s")},
            "calib_cache_hit": (m.get("calibration") or {}).get("cache_hit"),
            "reference_cache_hits": refs.get("hits"), "reference_built": refs.get("built"),
            "layer_error_mean": (m.get("layer_error") or {}).get("mean"), "lpips": m.get("lpips")}


def _lookup_yaml(path: Path, key: str):
    import yaml

    node = yaml.safe_load(path.read_text())
    for part in key.split("."):
        node = node[part]
    return node


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wan_tiny", help="model option (default wan_tiny)")
    parser.add_argument("--smoke", action="store_true", help="wan_tiny on CPU: checks the script and gives CPU numbers")
    parser.add_argument("--out", type=Path, default=Path("sweep_amortization.json"), help="results file (under bench/results/ unless absolute)")
    add_note_argument(parser)
    parser.add_argument("--workdir", type=Path, default=None, help="where run dirs and caches go (default: a temp dir, removed)")
    parser.add_argument("overrides", nargs="*", help="run.py overrides for every run (e.g. model.path=... eval=video)")
    args = parser.parse_args()

    model = "wan_tiny" if args.smoke else args.model
    base = [f"model={model}", *args.overrides]
    if args.smoke:
        base.append("model.device=cpu")
    if not any(o.startswith("eval=") for o in base) and (ROOT / "conf" / "eval" / "video.yaml").is_file():
        base.append("eval=video")  # 16-bit references are half of what a sweep shares
    name, fixed, key, values, note = sweep_axis()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vqx_sweep_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{note}: {key} in {','.join(values)}; overrides: {' '.join(base + fixed)}; work dir {work}", flush=True)

    load_before = os.getloadavg()  # these are wall times: a busy machine shows up here
    independent, independent_rows = [], []
    for i, value in enumerate(values):
        run_dir, cache = work / "independent" / str(i), work / "independent" / f"cache{i}"
        seconds = run_py([*base, *fixed, f"{key}={value}", f"hydra.run.dir={run_dir}", f"cache_dir={cache}"],
                         work / "logs" / f"independent{i}.log")
        independent.append(seconds)
        independent_rows.append({**job_row(run_dir, key), "wall_s": round(seconds, 2)})
        print(f"independent run {i} ({key}={value}): {seconds:.1f} s", flush=True)
    sweep_s = run_py(["-m", *base, *fixed, f"{key}={','.join(values)}", f"hydra.sweep.dir={work / 'sweep'}",
                      f"cache_dir={work / 'sweep_cache'}"], work / "logs" / "sweep.log")
    sweep_rows = [job_row(work / "sweep" / str(i), key) for i in range(len(values))]
    print(f"sweep of {len(values)} jobs: {sweep_s:.1f} s", flush=True)

    total = sum(independent)
    same = all(a["layer_error_mean"] == b["layer_error_mean"] and a["lpips"] == b["lpips"]
               for a, b in zip(sorted(independent_rows, key=lambda r: r["value"]), sorted(sweep_rows, key=lambda r: r["value"])))
    stage_sums = {s: {"independent": round(sum(r[s] or 0 for r in independent_rows), 2),
                      "sweep": round(sum(r[s] or 0 for r in sweep_rows), 2)} for s in (*STAGES, "total_s")}
    result = {
        "smoke": args.smoke,
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2),
                            "cpus": os.cpu_count()},
        "sweep": {"kind": name, "key": key, "values": values, "fixed": fixed, "overrides": base, "note": note},
        "independent_runs_s": [round(s, 2) for s in independent],
        "independent_total_s": round(total, 2),
        "sweep_s": round(sweep_s, 2),
        "sweep_over_independent": round(sweep_s / total, 3),  # the ratio: < 1 is what the shared cache saves
        "sweep_in_single_runs": round(sweep_s / statistics.fmean(independent), 2),  # a sweep costs this many runs
        # the same against the fastest single run: less sensitive to a busy machine slowing some runs
        "sweep_in_fastest_single_runs": round(sweep_s / min(independent), 2),
        "same_results": same,  # the cache must not change any number
        "stage_seconds": stage_sums,
    }
    out = write_results(args.out, {"independent": independent_rows, "sweep": sweep_rows}, result, note=args.note)
    print_table([{"stage": s, **v} for s, v in stage_sums.items()], ["stage", "independent", "sweep"])
    print(f"{len(values)} independent runs {total:.1f} s, one sweep {sweep_s:.1f} s: ratio {result['sweep_over_independent']}, "
          f"the sweep costs {result['sweep_in_single_runs']} single runs ({result['sweep_in_fastest_single_runs']} of the "
          f"fastest); same results: {same}; written {out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
