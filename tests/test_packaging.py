"""vqx as an installed package: `vqx run` from any directory reads the config groups, ready sweeps and wan_mini
shipped inside the package, runs share the user's cache by default, and a folder named vqx in the working
directory does not shadow the package."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import vqx
from conftest import ROOT, vqx_cli_in_process

PACKAGE = Path(vqx.__file__).resolve().parent


def test_vqx_run_composes_from_the_package_in_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VQX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    r = vqx_cli_in_process("run", "--cfg", "job", "--resolve")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["cache_dir"] == str(tmp_path / "xdg" / "vqx")  # not the working directory's .vqx_cache
    assert cfg["model"]["path"] == str(PACKAGE / "assets" / "wan_mini")
    monkeypatch.setenv("VQX_CACHE_DIR", str(tmp_path / "mine"))
    r = vqx_cli_in_process("run", "+sweep=formats", "--cfg", "hydra")  # no --config-dir: the sweeps ship too
    assert r.returncode == 0, r.stderr
    hydra = yaml.safe_load(r.stdout)["hydra"]
    assert hydra["job"]["name"] == "run"  # run.log, as python run.py names it
    assert "format" in hydra["sweeper"]["params"] and hydra["sweeper"]["params"]["export"] == "none"
    r = vqx_cli_in_process("run", "format=w9a9")
    assert r.returncode == 2 and r.stderr.startswith("vqx: error: format=w9a9 is not an option of 'format'"), r.stderr
    r = vqx_cli_in_process("run", "-m", "--cfg", "job")  # Hydra's own flag check: one line too
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Only one of --run, --multirun, --cfg" in r.stderr


def test_a_folder_named_vqx_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    (tmp_path / "vqx").mkdir()  # a clone named vqx, seen from its parent directory
    r = subprocess.run([sys.executable, "-c", "import vqx.entry, vqx; print(vqx.__file__)"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()).resolve() == PACKAGE / "__init__.py"


def _build_wheel(out: Path) -> Path:
    """The wheel `pip install .` builds (without build isolation where setuptools is new enough: no download), from
    a copy of the checkout's tracked tree: a build writes build/ into its source, whose leftovers would go in."""
    src = out.parent / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        dst, orig = src / name, ROOT / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if orig.is_symlink():
            dst.symlink_to(os.readlink(orig))
        elif orig.is_file():
            shutil.copy2(orig, dst)
    try:
        import setuptools

        isolated = int(setuptools.__version__.split(".")[0]) < 64
    except ImportError:
        isolated = True
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)]
    r = subprocess.run(cmd + ([] if isolated else ["--no-build-isolation"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("vqx-*.whl")
    return wheel


@pytest.mark.slow
def test_a_wheel_ships_conf_sweeps_assets_and_runs_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (p for base in ("conf", "sweeps", "assets") for p in (PACKAGE / base).rglob("*") if p.is_file()):
        if "__pycache__" not in path.parts and not path.name.startswith("."):
            assert path.relative_to(PACKAGE.parent).as_posix() in names, path
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1"}
    env.pop("VQX_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-m", "vqx", "run", "algorithm=rtn", "export=none", "eval=none", "logger=none",
                        "hydra.run.dir=out"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((work / "out" / "config.yaml").read_text())
    assert cfg["model"]["path"] == str(site / "vqx" / "assets" / "wan_mini")  # the wheel's model, not the checkout's
    assert (work / "out" / "run.log").is_file() and (tmp_path / "xdg" / "vqx").is_dir()


def test_vqx_list_shows_every_option_and_the_ready_sweeps_with_their_descriptions():
    r = vqx_cli_in_process("list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for group in ("format", "algorithm", "attention"):
        for f in (PACKAGE / "conf" / group).glob("*.yaml"):
            assert any(line.split()[:1] == [f.stem] for line in lines), (group, f.stem)
    start = lines.index("sweep (vqx run -m +sweep=NAME):")
    sweeps = {line.split()[0]: line.split(None, 1)[1] for line in lines[start + 1:]}
    assert set(sweeps) == {f.stem for f in (PACKAGE / "sweeps" / "sweep").glob("*.yaml")}
    assert sweeps["alpha"].startswith("SmoothQuant's migration strength alpha")  # not Hydra's "@package" line
    assert vqx_cli_in_process("list", "sweep").stdout.splitlines()[1:] == lines[start + 1:]
