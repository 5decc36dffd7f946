"""A run killed with SIGKILL at any point leaves nothing that is later read half-written, and rerunning the same
command finishes with the same results as a run that was never killed.

The kill points are found from outside (no hooks in the product code): the test polls the cache and run dir
and kills the process group when a stage's temporary folder appears.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from vqx.cache import MANIFEST, DiskCache

# every group named: the test does not depend on conf/config.yaml's defaults
ARGS = ["model=wan_tiny", "algorithm=rtn", "format=w8a8", "logger=none", "export=lightx2v", "eval=video", "eval.num_samples=1",
        "eval.noise_floor=none", "calib.num_prompts=2", "calib.steps=4"]  # stages long enough to be caught mid-way


def _env(cache: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "VQX_CACHE_DIR": str(cache)}
    env.pop("VQX_DEBUG", None)
    return env


def run(args, cache: Path, log: Path, kill_when=None, sig=signal.SIGKILL) -> str:
    """Run `python run.py ARGS`; with ``kill_when``, send ``sig`` to its process group as soon as kill_when() is
    true. Returns "killed" (SIGKILL) or "exit <code>". pytest-timeout bounds the wait; the group never outlives it."""
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=_env(cache), stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)  # its own group: ffmpeg children die too
        try:
            while p.poll() is None:
                if kill_when is not None and kill_when():
                    os.killpg(p.pid, sig)
                    p.wait()
                    return "killed" if sig == signal.SIGKILL else f"exit {p.returncode}"
                time.sleep(0.002)
        finally:
            if p.poll() is None:  # interrupted (the test's timeout): take the group down with the test
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return f"exit {p.returncode}"


def tmp_dirs(cache: Path, kind: str) -> list[Path]:
    """A cache entry being built: a hidden folder beside where the entry will land."""
    return [p for p in (cache / kind).glob("*/.*") if p.is_dir()]


def assert_nothing_half_done(run_dir: Path, cache: Path, export_allowed=False):
    assert not (run_dir / "metrics.json").exists()  # a killed run never looks complete
    if not export_allowed:
        assert not (run_dir / "export").exists()  # only a complete, verified export is ever renamed into place
    dc = DiskCache(cache)
    for manifest in cache.rglob(MANIFEST):
        entry = manifest.parent
        assert not entry.name.startswith("."), entry  # a temporary folder never holds a manifest's final name ...
        assert dc.is_complete(entry), entry  # ... and every published entry matches its hashes


def essence(run_dir: Path) -> dict:
    """What must not depend on kills, reruns or cache hits: the numbers and the exported bytes."""
    m = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((Path(m["export"]["dir"]) / "manifest.json").read_text())
    return {"layers": [(r["name"], r["output_error"], r.get("output_error_rtn")) for r in m["layers"]],
            "scores": [m["lpips"], m["psnr"], m["ssim"]],
            # weights and model config; the lightx2v run-config fragments name the folder, so they differ by path
            "export": {name: f["sha256"] for name, f in manifest["files"].items()
                       if name.endswith(".safetensors") or name == "config.json"},
            "verify_ok": m["export"]["verify"]["ok"]}


@pytest.mark.slow  # six runs, one after another
def test_kill_at_each_stage_then_rerun_gives_the_unkilled_result(tmp_path):
    base_dir = tmp_path / "baseline"
    assert run([*ARGS, f"hydra.run.dir={base_dir}"], tmp_path / "cache0", tmp_path / "baseline.log") == "exit 0", \
        (tmp_path / "baseline.log").read_text()[-3000:]
    expected = essence(base_dir)

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    cmd = [*ARGS, f"hydra.run.dir={run_dir}"]
    kill_points = [
        ("16-bit reference generation", lambda: bool(tmp_dirs(cache, "eval_video"))),
        ("calibration capture", lambda: bool(tmp_dirs(cache, "calib_capture"))),
        ("export (building or verifying)", lambda: bool(list(run_dir.glob(".export.partial.*")))),
    ]
    for i, (stage, trigger) in enumerate(kill_points):
        log = tmp_path / f"kill{i}.log"
        assert run(cmd, cache, log, kill_when=trigger) == "killed", f"{stage}: {log.read_text()[-3000:]}"
        assert_nothing_half_done(run_dir, cache)
    # each kill left its own stage's temporary folder behind: none of them is ever read
    assert tmp_dirs(cache, "eval_video") and tmp_dirs(cache, "calib_capture")
    assert list(run_dir.glob(".export.partial.*"))

    # evaluation of the quantized model: the export is already in place (complete and verified), metrics are not
    log = tmp_path / "kill3.log"
    assert run(cmd, cache, log, kill_when=lambda: (run_dir / "videos").exists()) == "killed", log.read_text()[-3000:]
    assert_nothing_half_done(run_dir, cache, export_allowed=True)
    assert (run_dir / "export" / "manifest.json").is_file()
    assert not list(run_dir.glob(".export.partial.*"))  # that export cleaned the killed one's leftovers

    # the very same command again: the intact export this config already made is kept, the rest is finished
    log = tmp_path / "final.log"
    assert run(cmd, cache, log) == "exit 0", log.read_text()[-3000:]
    assert essence(run_dir) == expected
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["calibration"]["cache_hit"] and m["videos"][0]["reference_cache_hit"]  # work of killed runs reused
    assert not (run_dir / "error.json").exists()  # a success clears the killed attempts' error record
    assert len([p for p in (cache / "calib_capture").rglob(MANIFEST)]) == 1
    assert len([p for p in (cache / "eval_video").rglob(MANIFEST)]) == 1


def test_ctrl_c_exits_130_in_one_line_and_keeps_the_finished_cache(tmp_path):
    """SIGINT (what Ctrl-C sends) during the block search, after the calibration capture went into the cache:
    exit 130, one line saying so, error.json saying so, and a later run reads the capture instead of capturing."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("algorithm=")] + ["export=none", f"hydra.run.dir={run_dir}"]
    log = tmp_path / "int.log"

    def searching():  # the capture is done and the (long) block search has begun
        return (run_dir / "run.log").is_file() and "stage calibrate done" in (run_dir / "run.log").read_text()

    r = run([*args, "algorithm=smoothquant"], cache, log, kill_when=searching, sig=signal.SIGINT)
    assert r == "exit 130", log.read_text()[-3000:]
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("vqx: error: interrupted (Ctrl-C); the cache keeps every calibration capture"), last
    assert "interrupted (Ctrl-C)" in json.loads((run_dir / "error.json").read_text())["error"]
    assert_nothing_half_done(run_dir, cache)
    log = tmp_path / "again.log"  # plain rounding reporting on the whole capture: it reads the same cache entry
    assert run([*args, "algorithm=rtn", "calib.layer_report=full"], cache, log) == "exit 0", log.read_text()[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["calibration"]["cache_hit"]


def test_a_second_run_into_a_busy_run_dir_is_refused_and_touches_nothing(tmp_path, vqx_run_in_process):
    """Two runs into one dir cannot interleave: the second stops in one line (exit 2) and leaves the first one's
    files (its error.json included) as they are; the lock goes with the first run."""
    from vqx.track.runs import LOCK_FILE, RunDirLock

    run_dir = tmp_path / "run"
    first = RunDirLock(run_dir)  # a live run holds the dir
    (run_dir / "error.json").write_text('{"error": "the first run\'s"}')
    args = ["algorithm=rtn", "export=none", "eval=none", "logger=none", f"hydra.run.dir={run_dir}"]
    r = vqx_run_in_process(args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"vqx: error: {run_dir} is in use by another vqx run (pid {os.getpid()} on {os.uname().nodename}); wait for "
        "it to finish or give this run another hydra.run.dir")
    assert (run_dir / "error.json").read_text() == '{"error": "the first run\'s"}'
    assert not (run_dir / "metrics.json").exists()
    first.release()
    r = vqx_run_in_process(args)
    assert r.returncode == 0, r.stderr
    assert (run_dir / "metrics.json").is_file() and not (run_dir / LOCK_FILE).exists()
    assert not (run_dir / "error.json").exists()  # the run that succeeded cleared the earlier record
