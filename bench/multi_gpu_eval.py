"""One run as one process against the same run on N GPUs under torchrun: equal results, and what each costs.

Runs ``python run.py OVERRIDES`` once as a single process and once under ``python -m torch.distributed.run
--standalone --nproc-per-node N run.py OVERRIDES``, both with OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1, each with
its own run dir and empty cache, then compares their metrics.json (every eval video's scores, per-frame curves
and noise floor, the aggregates, every layer's errors, every group's choice) and the exported weights (sha256).
Writes bench/results/multi_gpu_eval.json: a row per configuration (wall time, metrics.json timings, per-video
LPIPS) and what was equal.

    python bench/multi_gpu_eval.py                           # 2 GPUs: wan_tiny, 4 calibration prompts, 8 videos
    python bench/multi_gpu_eval.py --nproc 4 model=wan_mini  # any run.py overrides after the options
    python bench/multi_gpu_eval.py --smoke                   # CPU (gloo), 2 prompts and 2 videos: checks the script

Without a GPU the ranks run on the CPU through gloo (as tests/test_distributed.py does); the wall times then say
nothing about GPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, add_note_argument, print_table, write_results

DEFAULT = ["model=wan_tiny", "logger=none", "calib.num_prompts=4", "eval.num_samples=8"]
SMOKE = ["model=wan_tiny", "logger=none", "calib.num_prompts=2", "eval.num_samples=2"]
VIDEO_KEYS = ("index", "seed", "lpips", "psnr", "ssim", "per_frame", "noise_floor", "files")
AGGREGATES = ("lpips", "psnr", "ssim", "lpips_std", "psnr_std", "ssim_std", "per_frame", "noise_floor")


def run(cmd: list[str], log: Path) -> float:
    """Wall seconds of ``cmd`` (process start included); exits with its last stderr line when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("VQX_DEBUG", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        sys.exit(f"multi_gpu_eval: `{' '.join(cmd[1:])}` failed: {lines[-1] if lines else r.returncode} (log: {log})")
    return seconds


def weights_sha256(run_dir: Path) -> dict[str, str]:
    export = run_dir / "export"
    return {p.relative_to(export).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(export.rglob("*.safetensors"))} if export.is_dir() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (GPUs) of the second run (default 2)")
    parser.add_argument("--smoke", action="store_true", help="small run (gloo on CPU without a GPU): checks the script")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file, under bench/results/ unless absolute (default multi_gpu_eval[_smoke].json)")
    parser.add_argument("--workdir", type=Path, default=None, help="where run dirs and caches go (default: a temp dir, removed)")
    add_note_argument(parser)
    parser.add_argument("overrides", nargs="*", help="run.py overrides of both runs (default: " + " ".join(DEFAULT) + ")")
    args = parser.parse_args()
    if args.nproc < 2:
        parser.error("--nproc must be >= 2")
    gpus = torch.cuda.device_count()
    if gpus and gpus < args.nproc:
        parser.error(f"--nproc {args.nproc} but only {gpus} GPUs are visible")

    overrides = [*(SMOKE if args.smoke else DEFAULT), *args.overrides]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vqx_multi_gpu_"))
    runs = {"one": [sys.executable, str(ROOT / "run.py")],
            "ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
                      str(ROOT / "run.py")]}
    wall, metrics = {}, {}
    for name, cmd in runs.items():
        run_dir = work / name
        wall[name] = run([*cmd, *overrides, f"hydra.run.dir={run_dir}", f"cache_dir={work / f'cache_{name}'}"],
                         work / f"{name}.log")
        metrics[name] = json.loads((run_dir / "metrics.json").read_text())
        print(f"{name}: {wall[name]:.1f} s", flush=True)

    a, b = metrics["one"], metrics["ranks"]
    equal = {
        "videos": [{k: v.get(k) for k in VIDEO_KEYS} for v in a.get("videos", [])]
                  == [{k: v.get(k) for k in VIDEO_KEYS} for v in b.get("videos", [])],
        "aggregates": all(a.get(k) == b.get(k) for k in AGGREGATES),
        "layers": a["layers"] == b["layers"],
        "groups": a["groups"] == b["groups"],
        "export": weights_sha256(work / "one") == weights_sha256(work / "ranks"),
    }
    rows = [{"processes": 1 if name == "one" else args.nproc, "ranks": m.get("ranks"), "wall_s": round(wall[name], 2),
             "timings": m.get("timings"), "lpips": [v["lpips"] for v in m.get("videos", [])]}
            for name, m in metrics.items()]
    out = write_results(args.out or ("multi_gpu_eval_smoke.json" if args.smoke else "multi_gpu_eval.json"), rows, {
        "what": "python run.py OVERRIDES as one process and under python -m torch.distributed.run --standalone "
                "--nproc-per-node N (OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1, each with its own empty cache); equal "
                "compares the two runs' metrics.json and exported weights",
        "overrides": overrides, "nproc": args.nproc, "backend": "nccl" if gpus else "gloo (CPU)",
        "samples": len(a.get("videos", [])), "equal": equal,
    }, note=args.note)
    print_table([{k: r[k] for k in ("processes", "ranks", "wall_s")} | {"total_s": (r["timings"] or {}).get("total_s")}
                 for r in rows], ["processes", "ranks", "wall_s", "total_s"])
    print(f"equal: {equal}; written {out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(equal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
