"""The ready-made sweeps under sweeps/ and the launcher configs compose, and every job they make passes validation."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

import vqx.plugins  # noqa: F401  (schemas)
from vqx.config.validate import validate

ROOT = Path(__file__).resolve().parents[1]
SEARCH = f"hydra.searchpath=[file://{ROOT / 'sweeps'}]"  # what `--config-dir sweeps` adds
ALPHAS = [round(0.3 + 0.05 * i, 2) for i in range(13)]


def has_algorithm(name: str) -> bool:
    return (ROOT / "conf" / "algorithm" / f"{name}.yaml").is_file()


def needs(*algorithms):
    """Skip only while an algorithm's option file has not landed; once it exists the test must pass."""
    missing = [a for a in algorithms if not has_algorithm(a)]
    return pytest.mark.skipif(bool(missing), reason=f"conf/algorithm/{', '.join(missing)}.yaml not written yet")


def sweep_config(name, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"+sweep={name}", SEARCH, *overrides], return_hydra_config=True)


def expand(params, *command_line) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes from hydra.sweeper.params plus command-line overrides."""
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(command_line))
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return batch


def job_config(sweep_name, job_overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"+sweep={sweep_name}", SEARCH, *job_overrides])


@needs("smoothquant")
def test_alpha_sweep_covers_0_3_to_0_9_for_each_format():
    jobs = expand(sweep_config("alpha").hydra.sweeper.params)
    assert len(jobs) == 26
    seen = set()
    for overrides in jobs:
        cfg = job_config("alpha", overrides)
        validate(cfg)
        assert cfg.algorithm.name == "smoothquant"
        seen.add((cfg.format.name, round(cfg.algorithm.alpha, 2)))
    assert seen == {(f, a) for f in ("w8a8", "fp8") for a in ALPHAS}


def test_formats_sweep_covers_every_quantizing_format():
    jobs = expand(sweep_config("formats").hydra.sweeper.params)
    formats = []
    for overrides in jobs:
        cfg = job_config("formats", overrides)
        validate(cfg)
        assert cfg.export.name == "none"  # several formats have no lightx2v scheme
        formats.append(cfg.format.name)
    options = sorted(f.stem for f in (ROOT / "conf" / "format").glob("*.yaml") if f.stem != "none")
    assert sorted(formats) == options and len(formats) == 14
    assert formats[:4] == ["w8a8", "fp8", "fp8_static", "fp8_b128"]
    assert job_config("formats", ["format=fp8", "export=lightx2v"]).export.name == "lightx2v"


@needs("rtn", "smoothquant", "awq", "gptq", "smoothquant_gptq")
def test_algorithms_sweep_covers_every_algorithm_for_each_format():
    jobs = expand(sweep_config("algorithms").hydra.sweeper.params)
    pairs = set()
    for overrides in jobs:
        cfg = job_config("algorithms", overrides)
        validate(cfg)
        pairs.add((cfg.algorithm.name, cfg.format.name))
    assert pairs == {(a, f) for a in ("rtn", "smoothquant", "awq", "gptq", "smoothquant_gptq") for f in ("w8a8", "fp8")}


def test_attention_sweep_covers_linears_only_attention_only_and_both():
    """Every format of the sweep with every attention mode: the jobs `vqx compare` splits into linears only
    (attention none), attention only (format none) and both."""
    jobs = expand(sweep_config("attention").hydra.sweeper.params)
    pairs = set()
    for overrides in jobs:
        cfg = job_config("attention", overrides)
        validate(cfg)
        pairs.add((cfg.format.name, cfg.attention.name))
    modes = sorted(f.stem for f in (ROOT / "conf" / "attention").glob("*.yaml") if f.stem != "sage2_k_int8_v_fp8")
    assert pairs == {(f, a) for f in ("none", "w8a8", "fp8", "nvfp4") for a in modes} and len(jobs) == 20


@needs("smoothquant")
def test_optuna_sweep_searches_alpha_for_lowest_lpips():
    cfg = sweep_config("optuna_alpha")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.params["algorithm.alpha"] == "interval(0.3, 0.9)" and sweeper.n_trials >= 8
    assert cfg.objective == "lpips"
    for alpha in (0.3, 0.9):  # the interval's ends are valid jobs
        job = job_config("optuna_alpha", ["algorithm=smoothquant", f"algorithm.alpha={alpha}"])
        validate(job)
        assert job.algorithm.alpha == alpha


def test_command_line_value_replaces_the_swept_one():
    assert expand(sweep_config("formats").hydra.sweeper.params, "format=fp8") == [["export=none", "format=fp8"]]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "sweeps" / "sweep").glob("*.yaml")))
def test_ready_sweeps_export_nothing_unless_asked(name):
    """A 26-job sweep must not write 26 checkpoints; `export=lightx2v` on the command line still exports."""
    params = sweep_config(name).hydra.sweeper.params
    assert params["export"] == "none"
    if "interval(" not in " ".join(map(str, params.values())):  # the basic sweeper's jobs (Optuna samples its own)
        jobs = expand(params)
        assert jobs and all("export=none" in job for job in jobs)
        assert all("export=lightx2v" in job and "export=none" not in job
                   for job in expand(params, "export=lightx2v"))


def test_sweep_dir_option_from_the_command_line(vqx_run_in_process):
    """`--config-dir sweeps +sweep=NAME`, as users typed it before the sweeps shipped in the package, still composes
    (run.py's command line, in-process: it composes only; tests/test_packaging.py covers `+sweep` without it)."""
    r = vqx_run_in_process(["--config-dir", "sweeps", "+sweep=formats", "--cfg", "hydra"])
    assert r.returncode == 0, r.stderr
    assert "format: w8a8,fp8,fp8_static,fp8_b128,mxfp8,mxfp6,w4a16_g128,w4a8,mxfp4,nvfp4,w8a16,fp8_w,fp_e3m4,fp_e2m5" in r.stdout


def test_slurm_launcher_composes():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_task == 1 and launcher.partition == "gpu" and launcher.timeout_min > 0
    assert launcher.tasks_per_node == 1 and launcher.array_parallelism > 1


def test_slurm_launcher_composes_from_the_command_line(vqx_run_in_process):
    r = vqx_run_in_process(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"])
    assert r.returncode == 0, r.stderr
    assert "SlurmLauncher" in r.stdout and "gpus_per_task: 1" in r.stdout and "partition: gpu" in r.stdout
