"""run.log says how a run was started, on what, how long each stage took and how it ended; the console ends with
a short summary."""

import json

from vqx.track.run_log import summary_lines


def test_run_log_and_summary_of_a_run(vqx_run, tmp_path):
    run_dir = tmp_path / "run"
    r = vqx_run(["algorithm=rtn", "export=lightx2v", "eval=none", "logger=none", f"hydra.run.dir={run_dir}",
                 f"cache_dir={tmp_path / 'cache'}"])
    assert r.returncode == 0, r.stderr
    text = (run_dir / "run.log").read_text()
    assert "command: " in text and "run.py model=wan_tiny algorithm=rtn export=lightx2v" in text
    assert "versions: vqx " in text and ", torch " in text and ", diffusers " in text
    assert "device: cpu (" in text
    for stage in ("load", "reference", "calibrate", "quantize", "export", "eval"):
        assert f"stage {stage} done in " in text, stage
    export_dir = json.loads((run_dir / "metrics.json").read_text())["export"]["dir"]
    assert "result: complete in " in text and f"export: {export_dir} (lightx2v, " in text
    assert "; verified OK (block outputs: max relative error " in text
    assert "result: complete in " in r.stdout + r.stderr  # the summary is on the console too


def test_run_log_ends_with_the_error_of_a_failed_run(vqx_run, tmp_path):
    """A fault while running (here: the cache folder is a file, found at calibration)."""
    run_dir, not_a_folder = tmp_path / "run", tmp_path / "file"
    not_a_folder.write_text("x")
    r = vqx_run(["algorithm=rtn", "export=none", "eval=none", "logger=none", f"hydra.run.dir={run_dir}",
                 f"cache_dir={not_a_folder}"])
    assert r.returncode != 0
    error = json.loads((run_dir / "error.json").read_text())["error"]
    text = (run_dir / "run.log").read_text()
    assert "stage calibrate failed in " in text
    assert text.strip().splitlines()[-1].endswith(f"result: failed: {error}")


def test_summary_names_scores_against_the_noise_floor_and_the_export():
    metrics = {"format": "w8a8", "algorithm": "smoothquant", "model": "wan_mini", "quantized_layers": 40,
               "timings": {"total_s": 61.2}, "lpips": 0.0037, "psnr": 40.51, "ssim": 0.9891, "videos": [{}] * 8,
               "noise_floor": {"lpips": 0.0009, "psnr": 46.57, "ssim": 0.9967, "method": "sdpa_math"},
               "layer_error": {"mean": 0.01, "max": 0.05}, "layer_error_rtn": {"mean": 0.02},
               "export": {"dir": "/r/export", "kind": "lightx2v", "files": 7, "bytes": 21_000_000,
                          "verify": {"ok": True, "max_block_error": 2.2e-7, "tolerance": 3e-6}}}
    lines = summary_lines(metrics, "/r")
    assert lines == [
        "result: complete in 61.2 s: w8a8 smoothquant on wan_mini, 40 layers quantized; metrics in /r/metrics.json",
        "scores (mean over 8 videos): LPIPS 0.0037, PSNR 40.51 dB, SSIM 0.9891; noise floor (sdpa_math): "
        "LPIPS 0.0009, PSNR 46.57 dB, SSIM 0.9967",
        "layer output error: mean 0.01, max 0.05 (round to nearest: mean 0.02)",
        "export: /r/export (lightx2v, 7 files, 21.0 MB); verified OK (block outputs: max relative error 2.2e-07, "
        "tolerance 3e-06)"]
    failed = {**metrics, "export": {**metrics["export"], "verify": {"ok": False, "problems": ["scale x"]}}}
    assert summary_lines(failed, "/r")[-1].endswith("; verification FAILED: scale x")
