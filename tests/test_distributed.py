"""Several GPUs, tested on CPU: torchrun with 2 gloo ranks calibrates and evaluates with the single process's
results, and hydra/launcher=gpus gives every parallel sweep job a GPU of its own."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, run_vqx

# 3 prompts and 3 samples on 2 ranks: uneven shares (rank 0 gets 2, rank 1 gets 1), a last round of one sample
ARGS = ["model=wan_tiny", "logger=none", "calib.num_prompts=3", "eval.num_samples=3"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # torchrun's ranks use one thread; CPU sums then run in the same order


def _torchrun(args):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    env.pop("VQX_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "run.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.slow  # one run, then the same on two ranks
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    one = run_vqx([*ARGS, f"hydra.run.dir={tmp_path / 'one'}", f"cache_dir={tmp_path / 'cache_one'}"], env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun([*ARGS, f"hydra.run.dir={tmp_path / 'two'}", f"cache_dir={tmp_path / 'cache_two'}"])
    out = two.stdout + two.stderr
    assert two.returncode == 0, out[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))

    # the work was shared: prompts 0, 2 and samples 0, 2 on rank 0; prompt 1 and sample 1 on rank 1
    assert "60 transformer calls" in out and "40 of them on this rank" in out and "20 of them on this rank" in out
    assert "eval: 2 reference and 2 noise-floor videos" in out and "eval: 1 reference and 1 noise-floor videos" in out
    assert (a["ranks"], b["ranks"]) == (1, 2)

    # statistics reduced over ranks: every layer's errors and every group's choice as one process computes them
    assert b["layers"] == a["layers"] and b["groups"] == a["groups"] and b["calibration"] == a["calibration"]
    # the same quantized model: the exported weights, byte for byte
    weights = "diffusion_pytorch_model.safetensors"
    assert _files(tmp_path / "one" / "export")[weights] == _files(tmp_path / "two" / "export")[weights]
    # the same capture and 16-bit references in the cache, byte for byte
    # (one process also caches its float-model block statistics for later runs; ranks reduce their own)
    cache_one = {k: v for k, v in _files(tmp_path / "cache_one").items() if not k.startswith("block_stats/")}
    cache_two = _files(tmp_path / "cache_two")
    assert cache_one == cache_two and any(k.startswith("calib_capture/") and k.endswith("calls.safetensors") for k in cache_one)

    # every sample's scores and per-frame curves, and their aggregates
    keys = ("index", "seed", "lpips", "psnr", "ssim", "per_frame", "noise_floor", "files")
    assert [{k: v[k] for k in keys} for v in b["videos"]] == [{k: v[k] for k in keys} for v in a["videos"]]
    assert len(b["videos"]) == 3
    for key in ("lpips", "psnr", "ssim", "lpips_std", "psnr_std", "ssim_std", "per_frame", "noise_floor"):
        assert b[key] == a[key], key

    # rank 0 alone wrote the run dir: every sample's videos, one log
    run = tmp_path / "two"
    assert sorted(p.name for p in (run / "videos").iterdir()) == sorted(p.name for p in (tmp_path / "one" / "videos").iterdir())
    log = (run / "run.log").read_text()
    assert log.count("metrics written") == 1 and log.count("block 2/2 quantized") == 1
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "config.yaml").is_file()


@pytest.mark.slow  # one run, then the same on two ranks
def test_torchrun_on_a_cached_capture_equals_one_process(tmp_path):
    """A cache hit: rank 0 reads the capture and hands each rank its prompts' calls."""
    args = ["model=wan_tiny", "logger=none", "export=none", "eval=none", "calib.num_prompts=3", f"cache_dir={tmp_path / 'cache'}"]
    one = run_vqx([*args, f"hydra.run.dir={tmp_path / 'one'}"], env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"])
    out = two.stdout + two.stderr
    assert two.returncode == 0, out[-3000:]
    assert "[cache hit], 40 of them on this rank" in out and "[cache hit], 20 of them on this rank" in out
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert b["calibration"]["cache_hit"] and b["layers"] == a["layers"] and b["groups"] == a["groups"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calls() -> list[torch.Tensor]:
    """Calls of different token counts (some below the sample size) whose values span many magnitudes, so a sum
    in another order rounds differently."""
    g = torch.Generator().manual_seed(0)
    sizes = [9, 3, 12, 6, 10, 4, 8]
    return [torch.randn(n, 16, generator=g) * 10.0 ** torch.randint(-4, 5, (n, 1), generator=g) for n in sizes]


def _stats(device="cpu"):
    from vqx.calib.stats import GroupStats

    return GroupStats(16, sample_tokens=5, hessian_tokens=7, want_hessian=True, seed=3, device=torch.device(device))


def _reduce_on_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from vqx import distributed

    distributed.init()
    calls, st = _calls(), _stats()
    for c in range(rank, len(calls), world):  # this rank's calls: 0, 2, 4, 6 or 1, 3, 5
        st.update(calls[c], c)
    partial = {"sum_abs": st.sum_abs.clone(), "hessian": st.hessian.clone()}
    st.reduce()
    torch.save({"partial": partial, "absmax": st.absmax, "sum_abs": st.sum_abs, "count": st.count, "calls": st.calls,
                "samples": st.samples, "hessian": st.hessian, "hessian_count": st.hessian_count}, f"{out}/{rank}.pt")
    distributed.destroy()


def test_statistics_reduced_over_two_ranks_equal_one_process(tmp_path):
    one = _stats()
    for c, x in enumerate(_calls()):
        one.update(x)
    mp.spawn(_reduce_on_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]

    naive = ranks[0]["partial"]["sum_abs"] + ranks[1]["partial"]["sum_abs"]
    assert not torch.equal(naive, one.sum_abs)  # these calls tell a sum by rank from the single process's order
    for r in ranks:
        assert torch.equal(r["absmax"], one.absmax)  # max: exact
        assert torch.equal(r["sum_abs"], one.sum_abs)  # per-call sums added in call order: exact
        assert r["count"] == one.count and r["hessian_count"] == one.hessian_count and r["calls"] == list(range(7))
        assert len(r["samples"]) == len(one.samples) and all(torch.equal(x, y) for x, y in zip(r["samples"], one.samples))
        # Hessian: summed over ranks, so float32 rounding apart from one process (never the rank's own part)
        assert torch.allclose(r["hessian"], one.hessian, rtol=1e-5, atol=0)
        assert not torch.allclose(r["partial"]["hessian"], one.hessian, rtol=1e-2)
    assert torch.equal(ranks[0]["hessian"], ranks[1]["hessian"])  # and the same on every rank


def _job_times(run_log: str) -> tuple[datetime, datetime]:
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", run_log, re.M)
    return tuple(datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))


def test_gpu_launcher_gives_each_parallel_job_its_own_gpu(vqx_run, tmp_path):
    # two "GPUs" on a CPU machine: the launcher only reads CUDA_VISIBLE_DEVICES; jobs run on the CPU
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "TMPDIR": str(tmp_path), **ONE_THREAD}  # TMPDIR: this test's own leases
    r = vqx_run(["-m", "hydra/launcher=gpus", "algorithm=rtn", "export=none", "eval=none", "logger=none",
                 "format=w8a8,fp8,w8a16,fp8_w", f"hydra.sweep.dir={tmp_path / 'sweep'}"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = {}
    for n in range(4):
        log = (tmp_path / "sweep" / str(n) / "run.log").read_text()
        gpu, pid = re.search(r"job \d+: GPU (\d) \(CUDA_VISIBLE_DEVICES=\1, worker pid (\d+)\)", log).groups()
        jobs[n] = (gpu, pid, *_job_times(log))
    assert {gpu for gpu, *_ in jobs.values()} == {"0", "1"}  # n_jobs defaulted to the 2 visible GPUs
    workers = {pid: {gpu for gpu, p, *_ in jobs.values() if p == pid} for _, pid, *_ in jobs.values()}
    assert len(workers) == 2 and all(len(g) == 1 for g in workers.values())  # a worker keeps its GPU
    overlapping = [(i, j) for i in jobs for j in jobs if i < j and jobs[i][2] <= jobs[j][3] and jobs[j][2] <= jobs[i][3]]
    assert overlapping  # jobs did run at the same time ...
    assert all(jobs[i][0] != jobs[j][0] for i, j in overlapping)  # ... and never on the same GPU


def test_more_workers_than_gpus_share_them_evenly(tmp_path):
    """Three worker processes, two GPUs: leases 0, 1, then a second slot on 0; each held while its process lives."""
    code = ("import sys, time; from pathlib import Path; from vqx.gpus import lease_gpu; "
            "print(lease_gpu(['0', '1'], 3, Path(sys.argv[1])), flush=True); time.sleep(60)")
    procs, got = [], []
    try:
        for _ in range(3):
            p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            got.append(p.stdout.readline().strip())  # leased before the next one starts
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert got == ["0", "1", "0"]
