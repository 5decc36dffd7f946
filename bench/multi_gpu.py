"""Several GPUs at full size: one job under torchrun on N = 1, 2, 4, 8 GPUs, and a 6-point sweep on N GPUs.

For every N in --nprocs (default: 1, 2, 4, 8 up to the visible GPUs) the same run,
``python -m torch.distributed.run --standalone --nproc-per-node N run.py OVERRIDES`` (default: the synthetic
Wan2.1-14B, 40 blocks, 480p x 81 frames, 8 calibration prompts to shard, 4 eval samples; export=none), each with its
own run dir and empty cache, records the wall time, each stage's seconds (metrics.json timings: load, reference,
calibrate, quantize, export, eval), the peak GPU memory per GPU (nvidia-smi, sampled every 0.5 s) and the peak host
RSS of one process, and checks that its results equal the N=1 run's as tests/test_distributed.py defines equality
(every eval video's scores and curves, the aggregates, every layer's errors and every group's choice).
Then the sweep: ``python run.py -m hydra/launcher=gpus algorithm.alpha=<6 values>`` with CUDA_VISIBLE_DEVICES
limited to N GPUs, for each N: wall time and points per hour, against N=1. Writes bench/results/multi_gpu.json:
rows of kind "job" and "sweep", with speedups against N=1.

    python bench/multi_gpu.py --note "..."                              # every N the machine has
    python bench/multi_gpu.py --nprocs 1,2 --no-sweep eval.steps=10 --note "..."
    python bench/multi_gpu.py --smoke --note "script check"             # CPU: wan_tiny, N = 1, 2 through gloo

Without GPUs the ranks run on the CPU through gloo and the sweep is skipped (hydra/launcher=gpus needs GPUs); the
times then say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import ROOT, add_note_argument, print_table, write_results

FULL = ["model=wan_synthetic_14b", "logger=none", "export=none", "calib.num_prompts=8", "eval.num_samples=4"]
SMOKE = ["model=wan_tiny", "logger=none", "export=none", "calib.num_prompts=2", "eval.num_samples=2"]
ALPHAS = "0.3,0.4,0.5,0.6,0.7,0.8"
VIDEO_KEYS = ("index", "seed", "lpips", "psnr", "ssim", "per_frame", "noise_floor")
AGGREGATES = ("lpips", "psnr", "ssim", "lpips_std", "psnr_std", "ssim_std", "per_frame", "noise_floor")
STAGES = ("load_s", "reference_s", "calibrate_s", "quantize_s", "export_s", "eval_s", "total_s")


class GpuMemory:
    """Peak memory.used per GPU (MiB) from nvidia-smi while a run goes on; empty without nvidia-smi."""

    def __init__(self):
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.splitlines():
                i, used = (int(x) for x in line.split(","))
                self.peak[i] = max(self.peak.get(i, 0), used)
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(cmd: list[str], log: Path, env_extra: dict | None = None) -> float:
    """Wall seconds of ``cmd`` (process start included); exits with its last stderr line when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env_extra or {})}
    env.pop("VQX_DEBUG", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        sys.exit(f"multi_gpu: `{' '.join(cmd[1:])}` failed: {lines[-1] if lines else r.returncode} (log: {log})")
    return seconds


def weights_sha256(run_dir: Path) -> dict[str, str]:
    export = run_dir / "export"
    return {p.relative_to(export).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(export.rglob("*.safetensors"))} if export.is_dir() else {}


def equal_results(a: dict, b: dict, dir_a: Path, dir_b: Path) -> dict[str, bool]:
    """What tests/test_distributed.py holds equal between a one-process and a torchrun run (and the exported
    weights, when the runs export)."""
    return {
        "export": weights_sha256(dir_a) == weights_sha256(dir_b),
        "videos": [{k: v.get(k) for k in VIDEO_KEYS} for v in a.get("videos", [])]
                  == [{k: v.get(k) for k in VIDEO_KEYS} for v in b.get("videos", [])],
        "aggregates": all(a.get(k) == b.get(k) for k in AGGREGATES),
        "layers": a["layers"] == b["layers"],
        "groups": a["groups"] == b["groups"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", default=None, help="comma list of N (default: 1, 2, 4, 8 up to the visible GPUs)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the 6-point alpha sweep")
    parser.add_argument("--smoke", action="store_true", help="wan_tiny, N = 1, 2 (gloo on CPU without GPUs)")
    parser.add_argument("--out", default=None, help="results file under bench/results/ (default multi_gpu[_smoke].json)")
    parser.add_argument("--workdir", type=Path, default=None, help="run dirs and caches (default: a temp dir, removed)")
    add_note_argument(parser)
    parser.add_argument("overrides", nargs="*", help="run.py overrides (default: " + " ".join(FULL) + ")")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    counts = ([int(n) for n in args.nprocs.split(",")] if args.nprocs
              else [n for n in (1, 2, 4, 8) if n <= max(gpus, 1 if not args.smoke else 2)])
    if gpus and max(counts) > gpus:
        parser.error(f"--nprocs {max(counts)} but only {gpus} GPUs are visible")
    if 1 not in counts:
        parser.error("--nprocs must include 1 (the baseline every other N is compared with)")
    overrides = [*(SMOKE if args.smoke else FULL), *args.overrides]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vqx_multi_gpu_"))
    rows, metrics = [], {}

    for n in counts:
        run_dir = work / f"job_{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               str(ROOT / "run.py"), *overrides, f"hydra.run.dir={run_dir}", f"cache_dir={work / f'cache_{n}'}"]
        with GpuMemory() as mem:
            wall = run(cmd, work / f"job_{n}.log")
        m = metrics[n] = json.loads((run_dir / "metrics.json").read_text())
        timings = m.get("timings") or {}
        rows.append({"kind": "job", "gpus": n, "ranks": m.get("ranks"), "wall_s": round(wall, 2),
                     **{k: timings.get(k) for k in STAGES},
                     "peak_gpu_mib": dict(sorted(mem.peak.items())) or None,
                     "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
                     "equal_to_1": equal_results(metrics[1], m, work / "job_1", run_dir) if n != 1 else None})
        print(f"job on {n}: {wall:.1f} s", flush=True)
    base = next(r for r in rows if r["gpus"] == 1)
    for r in rows:
        r["speedup_wall"] = round(base["wall_s"] / r["wall_s"], 3)
        stages = [k for k in ("calibrate_s", "quantize_s", "eval_s") if r.get(k) is not None and base.get(k)]
        if stages:
            r["speedup_calib_quant_eval"] = round(sum(base[k] for k in stages) / sum(r[k] for k in stages), 3)

    if not args.no_sweep and gpus:
        for n in counts:
            sweep_dir = work / f"sweep_{n}"
            cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=gpus", f"algorithm.alpha={ALPHAS}",
                   *overrides, f"hydra.sweep.dir={sweep_dir}", f"cache_dir={work / f'sweep_cache_{n}'}"]
            with GpuMemory() as mem:
                wall = run(cmd, work / f"sweep_{n}.log", {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n)))})
            points = len(ALPHAS.split(","))
            rows.append({"kind": "sweep", "gpus": n, "points": points, "wall_s": round(wall, 2),
                         "points_per_hour": round(points * 3600 / wall, 2), "peak_gpu_mib": dict(sorted(mem.peak.items())) or None})
            print(f"sweep on {n}: {wall:.1f} s", flush=True)
        sweep_base = next(r for r in rows if r["kind"] == "sweep" and r["gpus"] == 1)
        for r in rows:
            if r["kind"] == "sweep":
                r["throughput_vs_1"] = round(r["points_per_hour"] / sweep_base["points_per_hour"], 3)
                r["throughput_vs_1_per_gpu"] = round(r["throughput_vs_1"] / r["gpus"], 3)

    equal = all(all(r["equal_to_1"].values()) for r in rows if r.get("equal_to_1"))
    out = write_results(args.out or ("multi_gpu_smoke.json" if args.smoke else "multi_gpu.json"), rows, {
        "what": "python -m torch.distributed.run --standalone --nproc-per-node N run.py OVERRIDES per N (each with its "
                "own empty cache; OMP_NUM_THREADS=1) and a 6-point algorithm.alpha sweep with hydra/launcher=gpus on N "
                "GPUs; equal_to_1: the N-rank run's metrics.json against the 1-rank run's",
        "overrides": overrides, "gpus_visible": gpus, "backend": "nccl" if gpus else "gloo (CPU)",
        "goals": "calibration + evaluation >= 1.8x on 2 GPUs, >= 3.2x on 4; sweep throughput >= 0.8 x N",
        "all_equal": equal}, note=args.note)
    print_table([{k: r.get(k) for k in ("kind", "gpus", "wall_s", "calibrate_s", "quantize_s", "eval_s", "speedup_wall",
                                         "speedup_calib_quant_eval", "throughput_vs_1")} for r in rows],
                ["kind", "gpus", "wall_s", "calibrate_s", "quantize_s", "eval_s", "speedup_wall",
                 "speedup_calib_quant_eval", "throughput_vs_1"])
    print(f"all equal to the 1-GPU run: {equal}; written {out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
