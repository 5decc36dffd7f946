"""logger=wandb: one offline W&B run per job inside its run dir, grouped by the sweep; logger=none never loads wandb."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import report_tables, vqx_cli_in_process
from vqx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["calib.num_prompts=1", "calib.steps=2"]  # tiny calibration: these tests are about tracking
NO_CREDENTIALS = {"WANDB_MODE": "", "WANDB_API_KEY": "", "NETRC": "/nonexistent/netrc"}


def wandb_records(run_folder: Path) -> dict:
    """The records of an offline run's ``run-<id>.wandb`` (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, frag, out = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        frag += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(frag)
            out.setdefault(record.WhichOneof("record_type"), []).append(record)
            frag = b""
    return out


def summary_of(records: dict) -> dict:
    out = {}
    for r in records.get("summary", []):
        for item in r.summary.update:
            key = item.key or "/".join(item.nested_key)
            out[key] = json.loads(item.value_json)
    return out


def config_of(records: dict) -> dict:
    (run,) = records["run"]
    return {item.key: json.loads(item.value_json) for item in run.run.config.update}


def compare(*args):
    return vqx_cli_in_process("compare", *args)


def test_three_job_sweep_logs_offline_runs_inside_the_sweep_dir(vqx_run, tmp_path):
    sweep, cwd = tmp_path / "sweep", tmp_path / "cwd"
    cwd.mkdir()
    r = vqx_run(["-m", "algorithm=smoothquant", "algorithm.alpha=0.5,0.75,0.9", "logger=wandb", *FAST,
                 f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}"], cwd=cwd, env=NO_CREDENTIALS)
    assert r.returncode == 0, r.stderr
    assert list(cwd.iterdir()) == []  # nothing in the working folder: W&B files live in the run dirs
    alphas = {}
    for i in range(3):
        job = sweep / str(i)
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "complete"
        (run_folder,) = (job / "wandb").glob("offline-run-*")
        # the end-of-run summary names the offline run and how to upload it
        assert f"W&B: offline run {run_folder}; upload it with `wandb sync {run_folder}`" in (job / "run.log").read_text()
        records = wandb_records(run_folder)
        assert records["run"][0].run.run_group == "sweep"  # grouped by the multirun (its dir's name here)
        config = config_of(records)
        assert config["algorithm"]["name"] == "smoothquant" and config["format"]["name"] == "w8a8"
        assert config["job"]["num"] == i and config["job"]["run_dir"] == str(job)
        alphas[i] = config["algorithm"]["alpha"]
        summary = summary_of(records)
        assert summary["status"] == "complete"
        assert summary["layer_error/mean"] == pytest.approx(metrics["layer_error"]["mean"])
        assert summary["quantized_layers"] == metrics["quantized_layers"]
        assert records["exit"][0].exit.exit_code == 0
        assert (run_folder / "files" / "vqx-config.yaml").is_file()
        assert json.loads((run_folder / "files" / "vqx-metrics.json").read_text())["status"] == "complete"
        assert list((run_folder / "files" / "media" / "table").glob("layers_*.table.json"))
    assert sorted(alphas.values()) == [0.5, 0.75, 0.9]

    c = compare(sweep)
    assert c.returncode == 0, c.stderr
    rows = report_tables(sweep / "report.html")["jobs"]
    header, body = rows[0], rows[1:]
    assert sorted(row[0] for row in body) == ["0", "1", "2"]
    col = header.index("algorithm.alpha")
    assert sorted(float(row[col]) for row in body) == [0.5, 0.75, 0.9]
    # the default run scores videos, so the report plots LPIPS (and PSNR) against alpha
    assert (sweep / "report_lpips_vs_alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_job_is_finished_with_exit_code_1_and_reported(vqx_run, tmp_path):
    """A job whose cache folder is a file fails at calibration; the sweep goes on, exits 1, and the report says why."""
    sweep, blocker = tmp_path / "sweep", tmp_path / "blocker"
    blocker.write_text("x")  # a file where job 1's cache folder should be
    r = vqx_run(["-m", "logger=wandb", *FAST, f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'},{blocker}"],
                env=NO_CREDENTIALS)
    assert r.returncode == 1, r.stderr
    assert "job 1" in r.stderr and "a part of the path is a file, not a folder" in r.stderr
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "complete"
    assert not (sweep / "0" / "error.json").exists()
    assert not (sweep / "1" / "metrics.json").exists()
    error = json.loads((sweep / "1" / "error.json").read_text())
    assert error["type"] == "UserError" and "a file, not a folder" in error["error"] and "\n" not in error["error"]

    (run_folder,) = (sweep / "1" / "wandb").glob("offline-run-*")
    records = wandb_records(run_folder)
    assert records["exit"][0].exit.exit_code == 1
    summary = summary_of(records)
    assert summary["status"] == "failed" and "Not a directory" in summary["error"] and str(blocker) in summary["error"]

    c = compare(sweep)
    assert c.returncode == 0, c.stderr
    assert "1 failed" in c.stdout
    tables = report_tables(sweep / "report.html")
    assert sorted(row[0] for row in tables["jobs"][1:]) == ["0", "1"]
    (failed,) = tables["failed"][1:]
    assert failed[0] == "1" and "UserError" in failed[1] and "a file, not a folder" in failed[1]


def test_logger_none_never_imports_wandb(tmp_path):
    """Every stage of the default job (calibration, SmoothQuant, verified lightx2v export, video scores) with
    logger=none, in a fresh interpreter through run.py's own entry; on wan_tiny with one prompt and one video, since
    what matters is which modules the run imports, not the model's size."""
    code = ("import runpy, sys; sys.argv = ['run.py', 'model=wan_tiny', 'logger=none', 'calib.num_prompts=1', "
            "'calib.steps=2', 'eval.num_samples=1', "
            f"'hydra.run.dir={tmp_path / 'run'}', 'cache_dir={tmp_path / 'cache'}']; "
            "runpy.run_path('run.py', run_name='__main__'); print('WANDB_LOADED', 'wandb' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (tmp_path / "run" / "export" / "manifest.json").is_file()  # exported and verified
    assert np.isfinite(m["lpips"]) and m["quantized_layers"] == 20 and m["algorithm"] == "smoothquant_gptq"
    assert "WANDB_LOADED False" in r.stdout


def test_online_without_credentials_is_a_one_line_error(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process(["logger=wandb", "logger.mode=online", f"hydra.run.dir={tmp_path}"], env=NO_CREDENTIALS)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "logger.mode=online needs W&B credentials" in r.stderr
    assert not (tmp_path / "wandb").exists()


def test_bad_mode_is_rejected(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process(["logger=wandb", "logger.mode=sometimes", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2 and "logger.mode='sometimes' is not valid" in r.stderr


@pytest.mark.parametrize("env,netrc_host,expected", [
    ({}, None, "offline"),
    ({"WANDB_API_KEY": "x" * 40}, None, "online"),
    ({}, "api.wandb.ai", "online"),
    ({}, "other.example.com", "offline"),
    ({"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}, None, "offline"),
    ({"WANDB_MODE": "disabled"}, None, "disabled"),
])
def test_auto_mode_goes_online_only_with_credentials(monkeypatch, tmp_path, env, netrc_host, expected):
    from vqx.track.wandb_logger import resolve_mode

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    if netrc_host:
        netrc.write_text(f"machine {netrc_host}\n  login user\n  password {'k' * 40}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert resolve_mode("auto") == expected
    assert resolve_mode("offline") == "offline"
    if expected != "online" and "WANDB_API_KEY" not in env:
        with pytest.raises(UserError, match="needs W&B credentials"):
            resolve_mode("online")


def test_videos_and_per_video_table_are_logged(tmp_path, monkeypatch):
    """Eval's side-by-side videos and metrics["videos"] reach the run (the logger alone, no model)."""
    import vqx.plugins  # noqa: F401
    from vqx.track.wandb_logger import WandbLogger

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "videos").mkdir(parents=True)
    video_bytes = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64  # content is not decoded for an mp4 path
    for name in ("000_side_by_side.mp4", "000_reference.mp4", "000_quantized.mp4"):
        (run_dir / "videos" / name).write_bytes(video_bytes)
    cfg = OmegaConf.create({"logger": {"name": "wandb", "project": "vqx", "entity": None, "mode": "offline",
                                       "group": "g", "tags": ["t1"], "log_videos": True}, "seed": 0})
    files = {k: f"videos/000_{k}.mp4" for k in ("reference", "quantized", "side_by_side")}
    metrics = {"status": "complete", "format": "fp8", "lpips": 0.125, "psnr": 31.5, "lpips_std": 0.0,
               "layer_error": {"mean": 0.01, "max": 0.02}, "noise_floor": {"lpips": 0.001, "method": "sdpa"},
               "videos": [  # as eval=video writes them
                   {"index": 0, "prompt": "a cat", "lpips": 0.125, "per_frame": {"lpips": [0.1, 0.15]},
                    "noise_floor": {"lpips": 0.001}, "files": files},
                   {"index": 1, "prompt": "a dog", "lpips": 0.25, "per_frame": {"lpips": [0.2, 0.3]}}]}
    logger = WandbLogger(cfg, run_dir)
    logger.start()
    logger.finish(metrics, None)
    import wandb

    wandb.teardown()  # wandb-core writes the run file asynchronously; a process exit or teardown completes it
    (run_folder,) = (run_dir / "wandb").glob("offline-run-*")
    summary = summary_of(wandb_records(run_folder))
    assert summary["lpips"] == 0.125 and summary["psnr"] == 31.5 and summary["layer_error/max"] == 0.02
    assert summary["noise_floor/lpips"] == 0.001 and "noise_floor/method" not in summary
    media = run_folder / "files" / "media"
    assert len(list((media / "videos" / "video").glob("000_side_by_side_*.mp4"))) == 1
    assert not list(media.rglob("000_quantized*")) and not list(media.rglob("000_reference*"))  # side by side only
    # tables go up as artifacts, staged inside the run dir; there the video cell is a player
    columns = ["index", "prompt", "lpips", "noise_floor/lpips", "files/reference", "files/quantized", "files/side_by_side"]
    staged = [json.loads(p.read_text()) for p in (run_dir / "wandb" / "data").rglob("tmp*") if p.read_bytes()[:1] == b"{"]
    tables = [t for t in staged if t.get("columns") == columns]
    assert tables  # (W&B may stage the same table twice)
    table = tables[0]
    assert [row[1] for row in table["data"]] == ["a cat", "a dog"]
    player = table["data"][0][6]
    assert player["_type"] == "video-file" and player["path"].endswith("000_side_by_side.mp4")
    assert table["data"][0][4] == "videos/000_reference.mp4"  # other files: their paths
    assert table["data"][1][3:] == [None, None, None, None]
    assert not (tmp_path / "wandb").exists()
