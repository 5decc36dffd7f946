"""Sweeps that run: joblib in parallel, resume into the same dir, Optuna's objective, error.json."""

import json
import math

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import vqx.plugins  # noqa: F401
from vqx.track.runs import completed_metrics, objective_value
from vqx.errors import UserError
from conftest import ROOT

# tiny calibration, the quantization spine only: these tests are about the sweep machinery (test_wandb.py sweeps
# the default job, export and video scores included)
FAST = ["calib.num_prompts=1", "calib.steps=2", "export=none", "eval=none", "logger=none"]


def sweep_args(tmp_path, *args):
    return ["-m", *args, *FAST, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}"]


def test_joblib_runs_two_jobs_in_parallel_processes(vqx_run, tmp_path):
    r = vqx_run(sweep_args(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "format=w8a8,fp8"))
    assert r.returncode == 0, r.stderr
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr
    formats = sorted(json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text())["format"] for i in (0, 1))
    assert formats == ["fp8", "w8a8"]


def test_rerun_into_the_same_dir_skips_completed_jobs(vqx_run, tmp_path):
    args = sweep_args(tmp_path, "format=w8a8,fp8")
    r = vqx_run(args)
    assert r.returncode == 0, r.stderr
    done, redo = tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    before = (done / "metrics.json").stat().st_mtime_ns
    (redo / "metrics.json").unlink()  # as if job 1 had been killed
    (redo / "error.json").write_text('{"error": "killed", "type": "KeyboardInterrupt"}')

    r = vqx_run(args)
    assert r.returncode == 0, r.stderr
    assert "skipping completed job 0" in (done / "run.log").read_text()
    assert "skipping completed job 1" not in (redo / "run.log").read_text()
    assert (done / "metrics.json").stat().st_mtime_ns == before  # not run again
    assert json.loads((redo / "metrics.json").read_text())["status"] == "complete"
    assert not (redo / "error.json").exists()  # a stale failure record goes once the job succeeds


def _config(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_completed_means_same_config_and_status_complete(tmp_path):
    cfg = _config("format=fp8")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "complete", "layer_error": {"mean": 0.5}}))
    assert completed_metrics(tmp_path, cfg)["layer_error"]["mean"] == 0.5
    assert completed_metrics(tmp_path, _config("format=fp8", "seed=1")) is None  # another config: run it
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "partial"}))
    assert completed_metrics(tmp_path, cfg) is None
    (tmp_path / "metrics.json").write_text('{"status": "compl')
    assert completed_metrics(tmp_path, cfg) is None


def test_objective_is_a_dotted_path_into_metrics():
    metrics = {"lpips": 0.25, "layer_error": {"mean": 0.125}, "status": "complete"}
    assert objective_value(metrics, "lpips") == 0.25
    assert objective_value(metrics, "layer_error.mean") == 0.125
    with pytest.raises(UserError, match=r"objective=psnr is not a number.*numeric entries: layer_error.mean, lpips"):
        objective_value(metrics, "psnr")


def test_optuna_alpha_sweep_minimizes_the_objective(vqx_run, tmp_path):
    """The shipped Optuna sweep, with a persistent study (the SQLAlchemy pin of the `sweep` extra makes it work)."""
    study = tmp_path / "study.db"
    r = vqx_run(["--config-dir", "sweeps", *sweep_args(tmp_path, "+sweep=optuna_alpha", "objective=layer_error.mean",
                                                      "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{study}")])
    assert r.returncode == 0, r.stderr
    assert study.stat().st_size > 0
    sweep = tmp_path / "sweep"
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = {}
    for i in (0, 1):
        cfg = yaml.safe_load((sweep / str(i) / "config.yaml").read_text())
        jobs[cfg["algorithm"]["alpha"]] = json.loads((sweep / str(i) / "metrics.json").read_text())["layer_error"]["mean"]
        assert cfg["algorithm"]["name"] == "smoothquant" and 0.3 <= cfg["algorithm"]["alpha"] <= 0.9
    assert results["best_value"] == pytest.approx(min(jobs.values()))
    assert jobs[results["best_params"]["algorithm.alpha"]] == pytest.approx(results["best_value"])


def test_optuna_failed_trial_scores_inf_and_the_study_goes_on(vqx_run_in_process, tmp_path):
    # the trial is refused before any model is built: in-process
    r = vqx_run_in_process(sweep_args(tmp_path, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
                                      "objective=layer_error.mean", "model=wan2.1_t2v_1.3b",
                                      f"model.path={tmp_path / 'no_model'}"))
    assert r.returncode == 0, r.stderr
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert math.isinf(results["best_value"])
    assert json.loads((tmp_path / "sweep" / "0" / "error.json").read_text())["type"] == "UserError"


def test_optuna_with_an_objective_no_job_reports_stops_with_one_line(vqx_run, tmp_path):
    r = vqx_run(sweep_args(tmp_path, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", "objective=nope"))
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vqx: error: objective=nope is not a number") and "layer_error.mean" in last
    assert "Traceback" not in r.stderr


def test_single_run_failure_writes_error_json_and_success_clears_it(vqx_run, tmp_path):
    run_dir, not_a_folder = tmp_path / "run", tmp_path / "file"
    not_a_folder.write_text("x")  # the cache folder is a file: found at calibration, after the checks
    r = vqx_run([*FAST, f"hydra.run.dir={run_dir}", f"cache_dir={not_a_folder}"])
    assert r.returncode == 2
    error = json.loads((run_dir / "error.json").read_text())
    assert error == {"error": error["error"], "type": "UserError"} and str(not_a_folder) in error["error"]
    assert error["error"] in r.stderr  # the same one line the user saw

    r = vqx_run([*FAST, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"])
    assert r.returncode == 0, r.stderr
    assert not (run_dir / "error.json").exists() and (run_dir / "metrics.json").is_file()


def test_multirun_with_a_failed_job_exits_1_after_the_rest(vqx_run_in_process, tmp_path):
    # the job is refused before any model is built: in-process
    r = vqx_run_in_process(sweep_args(tmp_path, "algorithm=rtn", "export=none", "eval=none", "logger=none",
                                      "model=wan2.1_t2v_1.3b", f"model.path={tmp_path / 'no_model'}"))
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vqx: error: 1 of 1 sweep jobs failed (job 0,") and "no_model is not a folder" in last
    assert (tmp_path / "sweep" / "0" / "error.json").is_file()


def test_failed_jobs_are_counted_over_every_batch(capsys):
    from hydra.core.utils import JobReturn, JobStatus

    from vqx.app import FailedJob, exit_if_jobs_failed

    def job(value):
        return JobReturn(status=JobStatus.COMPLETED, _return_value=value)

    exit_if_jobs_failed([[job({"lpips": 0.1}), job({"lpips": 0.2})]])  # all good: returns
    exit_if_jobs_failed(None)  # Optuna's sweeper returns nothing
    with pytest.raises(SystemExit) as e:
        exit_if_jobs_failed([[job({"lpips": 0.1})], [job(FailedJob(3, "multirun/x/3", "boom")), job({"lpips": 1})]])
    assert e.value.code == 1
    assert capsys.readouterr().err == ("vqx: error: 1 of 3 sweep jobs failed (job 3, multirun/x/3: boom; each "
                                       "failed job's error.json says why)\n")


@pytest.mark.parametrize("args", [["model=wan2.1_t2v_1.3b", "model.path=NO_MODEL", "logger=wandb"],
                                  ["format=fp_e3m4", "export=lightx2v"], ["calib.num_prompts=0"]])
def test_a_bad_setting_leaves_no_run_dir(vqx_run_in_process, tmp_path, args):
    """Refused after composition (a model folder, an export refusal, a bad value): one line, exit 2, and no run dir
    (no empty run.log, no error.json, no W&B run)."""
    run_dir = tmp_path / "outputs" / "run"
    args = [a.replace("NO_MODEL", str(tmp_path / "no_model")) for a in args]
    r = vqx_run_in_process([*args, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"], env={"WANDB_API_KEY": ""})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("vqx: error: ")
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_a_bad_setting_leaves_no_empty_outputs_folders_in_the_working_directory(vqx_run_in_process, tmp_path):
    """Hydra's default run dir (outputs/<date>/<time>) of a refused run goes with its empty parents, but never a
    folder another run still uses, nor anything outside the working directory."""
    r = vqx_run_in_process(["calib.num_prompts=0"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "outputs" / "earlier"
    kept.mkdir(parents=True)
    r = vqx_run_in_process(["calib.num_prompts=0", "hydra.run.dir=outputs/day/run"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["outputs", "outputs/earlier"]


def test_a_bad_setting_keeps_an_earlier_runs_dir(vqx_run_in_process, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")
    r = vqx_run_in_process(["calib.num_prompts=0", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 2, r.stderr
    assert (run_dir / "metrics.json").read_text() == "{}" and not (run_dir / "error.json").exists()
