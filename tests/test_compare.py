"""`vqx compare`: one report of every job of a multirun, from the run dirs alone (hand-made dirs: no model runs)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vqx.cli import main as vqx_main
from conftest import report_tables

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def make_job(root, name, overrides, config=None, metrics=None, metrics_text=None, error=None):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (job / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if metrics_text is not None:
        (job / "metrics.json").write_text(metrics_text)
    if error is not None:
        (job / "error.json").write_text(json.dumps(error))
    return job


def sq_job(root, name, fmt, alpha, lpips=None, psnr=None, err=0.01, algorithm="smoothquant"):
    metrics = {"status": "complete", "format": fmt, "algorithm": algorithm, "quantized_layers": 20,
               "layer_error": {"mean": err, "max": 2 * err}, "timings": {"total_s": 12.5}}
    if lpips is not None:
        metrics.update(lpips=lpips, psnr=psnr)
    config = {"format": {"name": fmt}, "algorithm": {"name": algorithm, "alpha": alpha}}
    return make_job(root, name, [f"algorithm={algorithm}", f"format={fmt}", f"algorithm.alpha={alpha}", "+sweep=alpha"],
                    config, metrics)


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    sq_job(root, "0", "w8a8", 0.5, lpips=0.20, psnr=30.0)
    sq_job(root, "1", "w8a8", 0.75, lpips=0.10, psnr=32.0)  # best w8a8
    sq_job(root, "2", "fp8", 0.5, lpips=0.05, psnr=35.0)  # best fp8
    sq_job(root, "3", "fp8", 0.75, lpips=0.07, psnr=34.0)
    make_job(root, "4", ["format=w8a8", "algorithm.alpha=0.9"], metrics_text='{"status": "complete", "lay')
    make_job(root, "5", ["format=fp8", "algorithm.alpha=0.9"],
             error={"error": "model.path=/x is not a folder", "type": "UserError"})
    make_job(root, "6", ["format=fp8", "algorithm.alpha=0.3"], metrics={"status": "partial", "format": "fp8"})
    make_job(root, "10", ["format=fp8", "algorithm.alpha=0.35"])  # started, never finished
    return root


def test_report_lists_jobs_best_per_format_and_failures(sweep, capsys):
    assert vqx_main(["compare", str(sweep)]) == 0
    assert "8 jobs, 4 complete, 4 failed or partial" in capsys.readouterr().out
    report = sweep / "report.html"
    tables = report_tables(report)

    header, *rows = tables["jobs"]
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4", "5", "6", "10"]  # natural order
    by_job = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_job["1"]["LPIPS"] == "0.1000" and by_job["1"]["PSNR"] == "32.00" and by_job["1"]["algorithm.alpha"] == "0.75"
    assert by_job["2"]["layer err mean"] == "1.000e-02" and by_job["2"]["quantized"] == "20" and by_job["2"]["time (s)"] == "12.5"
    assert by_job["4"]["status"] == "failed" and by_job["4"]["LPIPS"] == ""

    best = {r[0]: r for r in tables["best"][1:]}
    assert best["w8a8"][1] == "1" and best["fp8"][1] == "2"
    assert "lowest LPIPS" in best["w8a8"][2]
    html = report.read_text()
    assert len(re.findall(r"<tr class='best'>", html)) == 2

    failed = {r[0]: r[1] for r in tables["failed"][1:]}
    assert set(failed) == {"4", "5", "6", "10"}
    assert "metrics.json is unreadable" in failed["4"]
    assert failed["5"] == "failed: UserError: model.path=/x is not a folder"
    assert "status 'partial'" in failed["6"]
    assert "no metrics.json" in failed["10"]


def test_markdown_table_has_complete_jobs_with_noise_floor(sweep, capsys):
    metrics_path = sweep / "1" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics_path.write_text(json.dumps({**metrics, "noise_floor": {"lpips": 0.001, "psnr": 60.5}}))
    assert vqx_main(["compare", str(sweep)]) == 0
    assert f"table: {sweep / 'report.md'}" in capsys.readouterr().out
    lines = (sweep / "report.md").read_text().splitlines()
    assert lines[0] == ("| format | algorithm | +sweep | algorithm.alpha | LPIPS | PSNR | LPIPS noise floor | "
                        "PSNR noise floor | layer err mean |")
    rows = [ln for ln in lines[2:] if ln.startswith("| ")]
    assert rows[0] == "| fp8 | smoothquant | alpha | 0.5 | 0.0500 | 35.00 |  |  | 1.000e-02 |"
    assert "| w8a8 | smoothquant | alpha | 0.75 | 0.1000 | 32.00 | 0.0010 | 60.50 | 1.000e-02 |" in rows
    assert len(rows) == 4  # complete jobs only
    assert lines[-1].startswith("Failed or partial: 4 (") and "10 (no metrics.json" in lines[-1]


def test_report_is_offline_and_sortable_with_embedded_plots(sweep):
    assert vqx_main(["compare", str(sweep)]) == 0
    html = (sweep / "report.html").read_text()
    assert "<script src" not in html and "<link" not in html and "http" not in html  # nothing to fetch
    assert "function sortBy" in html and html.count('onclick="sortBy(this)"') >= 10
    for name in ("lpips_vs_alpha", "psnr_vs_alpha", "algorithm_format_grid"):
        png = sweep / f"report_{name}.png"
        assert png.read_bytes()[:8] == PNG, name
        assert f"title='report_{name}.png'" in html
    assert html.count("src='data:image/png;base64,") == 3
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_without_lpips_ranks_by_layer_error_and_says_so(tmp_path, capsys):
    root = tmp_path / "sweep"
    for i, (fmt, err) in enumerate([("w8a8", 0.03), ("w8a8", 0.01), ("fp_e3m4", 0.02)]):
        make_job(root, str(i), [f"format={fmt}"], {"format": {"name": fmt}, "algorithm": {"name": "rtn"}},
                 {"status": "complete", "format": fmt, "algorithm": "rtn", "layer_error": {"mean": err, "max": err}})
    assert vqx_main(["compare", str(root)]) == 0
    tables = report_tables(root / "report.html")
    best = {r[0]: r for r in tables["best"][1:]}
    assert best["w8a8"][1] == "1" and "lowest mean layer error (no LPIPS" in best["w8a8"][2]
    assert "LPIPS" not in tables["jobs"][0]  # no empty metric columns
    assert (root / "report_algorithm_format_grid.png").is_file()  # rtn x two formats
    assert not (root / "report_layer_error_mean_vs_alpha.png").exists()  # no alpha in these jobs


def test_several_dirs_make_one_report(sweep, tmp_path):
    other = tmp_path / "other"
    sq_job(other, "0", "w8a8", 0.6, lpips=0.01, psnr=40.0, algorithm="smoothquant_gptq")
    out = tmp_path / "reports" / "all.html"
    assert vqx_main(["compare", str(sweep), str(other), "--out", str(out)]) == 0
    tables = report_tables(out)
    names = [r[0] for r in tables["jobs"][1:]]
    assert "other/0" in names and "multirun/1" in names and len(names) == 9
    assert {r[0]: r[1] for r in tables["best"][1:]}["w8a8"] == "other/0"
    assert (tmp_path / "reports" / "all_algorithm_format_grid.png").is_file()


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: p, "no jobs under"),
])
def test_bad_dir_is_a_one_line_error(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as e:
        vqx_main(["compare", str(make(tmp_path))])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_jobs_of_two_models_rank_apart_with_floor_spread_and_links(tmp_path):
    """Runs of different models are never ranked against each other; format and algorithm are columns once (not
    again as overrides); the noise floor and the spread over videos are columns; each job links to its folder."""
    root = tmp_path / "multirun"
    for i, (model, lpips) in enumerate([("wan_mini", 0.004), ("wan_mini", 0.003), ("wan_tiny", 0.0001)]):
        metrics = {"status": "complete", "model": model, "format": "w8a8", "algorithm": "rtn", "lpips": lpips,
                   "lpips_std": lpips / 2, "psnr": 40.0 + i, "noise_floor": {"lpips": 0.0009, "psnr": 46.5},
                   "layer_error": {"mean": 0.01, "max": 0.02}}
        make_job(root, str(i), [f"model={model}", "format=w8a8", "algorithm=rtn", f"seed={i}"],
                 {"model": {"name": model}, "format": {"name": "w8a8"}, "algorithm": {"name": "rtn"}}, metrics)
    assert vqx_main(["compare", str(root)]) == 0
    tables = report_tables(root / "report.html")
    header, *rows = tables["jobs"]
    assert header.count("format") == 1 and header.count("algorithm") == 1 and header.count("model") == 1
    assert {"LPIPS std", "LPIPS floor", "PSNR floor", "seed"} <= set(header)
    by_job = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_job["1"]["LPIPS std"] == "0.0015" and by_job["1"]["LPIPS floor"] == "0.0009"
    best = {r[0]: r[1] for r in tables["best"][1:]}
    assert best == {"wan_mini / w8a8": "1", "wan_tiny / w8a8": "2"}
    html = (root / "report.html").read_text()
    assert "Best configuration per model and format" in html and "<a href='0/'>0</a>" in html
    assert not list(root.glob("report_*.png"))  # one algorithm, one format, no alpha: no axis was swept


def test_alpha_is_plotted_only_when_it_was_swept(tmp_path):
    root = tmp_path / "multirun"
    sq_job(root, "0", "w8a8", 0.5, lpips=0.2, psnr=30.0)
    sq_job(root, "1", "fp8", 0.5, lpips=0.1, psnr=32.0)
    assert vqx_main(["compare", str(root)]) == 0
    assert sorted(p.name for p in root.glob("report_*.png")) == ["report_algorithm_format_grid.png"]


def test_each_jobs_frame_strip_is_embedded_shrunk(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    root = tmp_path / "multirun"
    for i in range(2):
        job = sq_job(root, str(i), "w8a8", 0.5 + i / 4, lpips=0.1, psnr=30.0)
        metrics = json.loads((job / "metrics.json").read_text())
        if i == 0:  # job 1 has no strip (eval.save_videos=false): it is simply not shown
            (job / "videos").mkdir()
            Image.fromarray(np.full((3 * 100, 3 * 240, 3), 200, np.uint8)).save(job / "videos" / "000_strip.png")
            metrics["videos"] = [{"index": 0, "strip": "videos/000_strip.png"}]
        (job / "metrics.json").write_text(json.dumps(metrics))
    assert vqx_main(["compare", str(root)]) == 0
    html = (root / "report.html").read_text()
    assert "<h2>Frames</h2>" in html and html.count("<figure>") == 1 and "<figcaption>0: w8a8 smoothquant" in html
    b64 = re.search(r"<figure><img alt='0' src='data:image/png;base64,([^']+)'>", html).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (360, 150)  # 720 x 300 shrunk to 360 wide


def test_attention_sweep_splits_linears_attention_and_both(tmp_path):
    """A format x attention sweep: per format and attention mode, the linears-only, attention-only and combined jobs
    side by side (HTML and Markdown); a pair without its attention-only job gets no row."""
    root = tmp_path / "multirun"
    runs = {("none", "none"): (0.0, 99.0), ("w8a8", "none"): (0.002, 41.0), ("none", "sage2"): (0.004, 38.0),
            ("w8a8", "sage2"): (0.005, 37.0), ("nvfp4", "none"): (0.03, 30.0), ("nvfp4", "nvfp4"): (0.06, 27.0)}
    for n, ((fmt, attn), (lpips, psnr)) in enumerate(runs.items()):
        metrics = {"status": "complete", "format": fmt, "algorithm": "smoothquant", "lpips": lpips, "psnr": psnr,
                   "attention": {"name": attn} if attn == "none" else {"name": attn, "sites": ["self", "cross"],
                                                                        "full_precision_steps": []},
                   "noise_floor": {"lpips": 0.0007}}
        make_job(root, str(n), [f"format={fmt}", f"attention={attn}"], {"format": {"name": fmt}}, metrics)
    assert vqx_main(["compare", str(root)]) == 0
    header, *rows = report_tables(root / "report.html")["split"]
    assert header == ["format", "algorithm", "attention", "LPIPS linears only", "LPIPS attention only", "LPIPS both",
                      "PSNR linears only", "PSNR attention only", "PSNR both", "LPIPS floor"]
    assert rows == [["w8a8", "smoothquant", "sage2", "0.0020", "0.0040", "0.0050", "41.00", "38.00", "37.00", "0.0007"]]
    md = (root / "report.md").read_text()
    assert "| w8a8 | smoothquant | sage2 | 0.0020 / 0.0040 / 0.0050 | 41.00 / 38.00 / 37.00 |" in md


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (.ci/run installs Debian's chromium)")
def test_report_fits_a_laptop_window_in_a_headless_browser(sweep):
    """scripts/check_report_layout.py renders the report in headless Chromium at 1280 and 1400 px: the page must not
    scroll sideways (wide tables scroll inside their box), even with a job whose override is a 40-pattern list (which
    made the page 5,664 px wide before such values wrapped); it leaves a screenshot per width beside the report."""
    long = "format.skip_patterns=[" + ",".join(f"blocks.{i}.attn1.to_q" for i in range(40)) + "]"
    sq_job(sweep, "11", "fp8", 0.6, lpips=0.04, psnr=36.0)  # the best fp8 job: its overrides fill the best table
    overrides = yaml.safe_load((sweep / "11" / ".hydra" / "overrides.yaml").read_text())
    (sweep / "11" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, long]))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report_layout.py"), str(sweep)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [line.split(" px:")[0] for line in lines] == ["1280", "1400"] and all(": fits;" in line for line in lines)
    for width in (1280, 1400):
        assert (sweep / f"report_{width}.png").read_bytes().startswith(PNG)
    html = (sweep / "report.html").read_text()  # the long list is a wrapping cell inside a scroll box
    assert "<div class='scroll'><table id='best'>" in html and 'class="text wrap">format=fp8' in html


def test_jobs_are_paired_against_rtn_with_intervals_over_prompts(tmp_path):
    """Per job, the RTN job of the same overrides but the algorithm's, on the same videos: mean paired differences
    with Student's t intervals over the prompts' means (a prompt's seeds count once), worst video, verdict; no row
    without an RTN counterpart or with other videos."""
    root = tmp_path / "multirun"
    prompts = ["a red circle", "a blue square", "a green triangle"]
    rtn_psnr, rtn_lpips = [30.0, 31.0, 32.0, 33.0, 34.0, 35.0], [0.010] * 6

    def job(name, algorithm, fmt, d_psnr, d_lpips, seeds=(1, 2)):
        videos = [{"index": i, "prompt": prompts[i // 2], "seed": seeds[i % 2], "psnr": rtn_psnr[i] + d_psnr[i],
                   "lpips": rtn_lpips[i] + d_lpips[i], "ssim": 0.9} for i in range(6)]
        metrics = {"status": "complete", "format": fmt, "algorithm": algorithm, "videos": videos,
                   "lpips": sum(v["lpips"] for v in videos) / 6, "psnr": sum(v["psnr"] for v in videos) / 6}
        extra = ["algorithm.alpha=0.5"] if algorithm == "smoothquant" else []
        make_job(root, name, [f"algorithm={algorithm}", f"format={fmt}", *extra], {"format": {"name": fmt}}, metrics)

    job("0", "rtn", "w8a8", [0.0] * 6, [0.0] * 6)
    # prompt means 2, 2, 5: mean 3, sd sqrt(3); half-width t(0.975, 2) * sqrt(3) / sqrt(3) = 4.3027
    job("1", "smoothquant", "w8a8", [1, 3, 2, 2, 4, 6], [-0.002, -0.004, -0.003, -0.003, -0.001, -0.001])
    # prompt means -2.1, -1.9, -2.0: sd 0.1, half-width 0.2484: a loss
    job("2", "awq", "w8a8", [-2.0, -2.2, -1.8, -2.0, -2.1, -1.9], [0.0] * 6)
    job("3", "awq", "fp8", [1.0] * 6, [0.0] * 6)  # no fp8 RTN job
    job("4", "gptq", "w8a8", [1.0] * 6, [0.0] * 6, seeds=(1, 3))  # other videos than RTN's
    assert vqx_main(["compare", str(root)]) == 0
    header, *rows = report_tables(root / "report.html")["paired"]
    assert header == ["job", "format", "algorithm", "dPSNR vs RTN [95%]", "dLPIPS vs RTN [95%]", "worst dPSNR",
                      "prompts", "videos", "verdict"]
    assert rows == [["1", "w8a8", "smoothquant", "+3.00 [-1.30, +7.30]", "-0.0023 [-0.0052, +0.0005]", "+1.00", "3",
                     "6", "within noise"],
                    ["2", "w8a8", "awq", "-2.00 [-2.25, -1.75]", "+0.0000 [+0.0000, +0.0000]", "-2.20", "3", "6",
                     "worse"]]
    md = (root / "report.md").read_text()
    assert "| w8a8 | awq | -2.00 [-2.25, -1.75] | +0.0000 [+0.0000, +0.0000] | -2.20 | 3 | 6 | worse |" in md


def test_several_dirs_pair_each_job_with_the_rtn_job_of_its_own_sweep(tmp_path):
    """Two sweeps with the same overrides (say, two machines): each job is paired with its own sweep's RTN job."""
    def sweep_dir(name, rtn_psnr, sq_psnr):
        root = tmp_path / name
        for job, algorithm, psnr in (("0", "rtn", rtn_psnr), ("1", "smoothquant", sq_psnr)):
            videos = [{"prompt": f"p{i}", "seed": 1, "psnr": psnr + i, "lpips": 0.01} for i in range(3)]
            make_job(root, job, [f"algorithm={algorithm}", "format=w8a8"], {"format": {"name": "w8a8"}},
                     {"status": "complete", "format": "w8a8", "algorithm": algorithm, "videos": videos,
                      "lpips": 0.01, "psnr": psnr + 1})
        return root

    a, b = sweep_dir("a", 30.0, 31.0), sweep_dir("b", 40.0, 38.0)
    assert vqx_main(["compare", str(a), str(b), "--out", str(tmp_path / "report.html")]) == 0
    _, *rows = report_tables(tmp_path / "report.html")["paired"]
    assert [(r[0], r[3]) for r in rows] == [("a/1", "+1.00 [+1.00, +1.00]"), ("b/1", "-2.00 [-2.00, -2.00]")]
