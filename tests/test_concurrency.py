"""Four jobs at once on one cache_dir (as a sweep on shared storage runs them) give the results of serial runs:
the calibration capture and each 16-bit reference are built once, by one job, and read whole by the others."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from vqx.cache import MANIFEST, DiskCache

# every group named: the test does not depend on conf/config.yaml's defaults
ARGS = ["model=wan_tiny", "algorithm=rtn", "export=none", "logger=none", "eval=video", "eval.num_samples=2", "eval.noise_floor=none",
        "eval.save_videos=false", "calib.num_prompts=2", "calib.steps=2"]
# two formats twice: every job shares the capture and the references (neither depends on the format)
JOBS = {"a": "format=w8a8", "b": "format=fp8", "c": "format=w8a8", "d": "format=fp8"}


def _start(args, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VQX_CACHE_DIR": str(cache)}
    env.pop("VQX_DEBUG", None)
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _numbers(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"layers": [(r["name"], r["output_error"]) for r in m["layers"]],
            "videos": [(v["lpips"], v["psnr"], v["ssim"]) for v in m["videos"]]}


@pytest.mark.slow  # six runs, four at once: about two minutes on 2 cores
def test_four_parallel_jobs_match_serial_runs_and_build_each_entry_once(tmp_path):
    shared = tmp_path / "shared_cache"
    procs = {n: _start([*ARGS, fmt, f"hydra.run.dir={tmp_path / n}"], shared) for n, fmt in JOBS.items()}
    try:
        outputs = {n: p.communicate()[0] for n, p in procs.items()}
    finally:  # the test's timeout: no job outlives it
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for n, p in procs.items():
        assert p.returncode == 0, outputs[n][-3000:]

    serial = {}
    for fmt in ("format=w8a8", "format=fp8"):  # one at a time, each on its own cache
        d = tmp_path / f"serial_{fmt[7:]}"
        p = _start([*ARGS, fmt, f"hydra.run.dir={d}"], tmp_path / f"cache_{fmt[7:]}")
        out = p.communicate()[0]
        assert p.returncode == 0, out[-3000:]
        serial[fmt] = _numbers(d)

    for n, fmt in JOBS.items():
        assert _numbers(tmp_path / n) == serial[fmt], n  # bit-identical to a serial run of the same config
    assert serial["format=w8a8"] != serial["format=fp8"]  # the comparison can tell formats apart

    # one entry per key, each complete; no temporary folder left (no job was killed)
    dc = DiskCache(shared)
    captures = list((shared / "calib_capture").rglob(MANIFEST))
    references = list((shared / "eval_video").rglob(MANIFEST))
    assert len(captures) == 1 and len(references) == 2
    assert all(dc.is_complete(m.parent) for m in captures + references)
    assert not [p for p in shared.rglob(".*") if p.is_dir()]

    # each entry built by exactly one job: the others waited on its lock and read it
    metrics = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in JOBS]
    assert sum(not m["calibration"]["cache_hit"] for m in metrics) == 1
    assert sum(not v["reference_cache_hit"] for m in metrics for v in m["videos"]) == 2
    logs = "".join((tmp_path / n / "run.log").read_text() for n in JOBS)
    captured = re.findall(r"calibration capture: \d+ transformer calls.*", logs)
    assert len(captured) == 4 and sum("[cache hit]" not in line for line in captured) == 1
