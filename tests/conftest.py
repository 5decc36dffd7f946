import contextlib
import io
import logging
import os
import runpy
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under xdist, split the cores between the workers: each worker and the runs it starts (subprocesses inherit
    OMP_NUM_THREADS) use cores / workers intra-op threads, instead of every worker spinning a pool as wide as the
    machine (2 workers x 2 threads on 2 cores oversubscribes them). An OMP_NUM_THREADS the user set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def pin_tiny(overrides):
    """``overrides`` plus model=wan_tiny unless they name a model: the suite tests the machinery on the random
    tiny Wan (fast); the default model (wan_mini) has its own tests."""
    overrides = list(overrides)
    if any(o.lstrip("+~").startswith("model=") for o in overrides):
        return overrides
    # next to the other overrides: argparse rejects positionals on both sides of a flag such as --cfg
    i = next((k for k, o in enumerate(overrides) if "=" in o and not o.startswith("-")), len(overrides))
    return [*overrides[:i], "model=wan_tiny", *overrides[i:]]


def _run_env(env):
    """The test process's environment for a run: offline, no VQX_DEBUG unless ``env`` sets it."""
    full_env = {k: v for k, v in os.environ.items() if k != "VQX_DEBUG"}
    return {**full_env, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}


def run_vqx(args, cwd=None, env=None, pin_model=True):
    """Run `python run.py ARGS` as a user would, in a new process (on wan_tiny unless ARGS name a model or
    ``pin_model`` is false); returns CompletedProcess (text). pytest-timeout bounds it (pyproject.toml)."""
    args = pin_tiny(args) if pin_model else list(args)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd or ROOT, env=_run_env(env),
                          capture_output=True, text=True)


def run_vqx_in_process(args, cwd=None, env=None, pin_model=True):
    """`python run.py ARGS` in this process: run.py's own ``__main__`` block (the same entry, Hydra's command
    line, the one-line error handling, the exit code), without the interpreter start-up and imports of a new
    process. For runs that stop before a model is built (refusals) and compose-only commands (--cfg);
    ``run_vqx`` keeps covering the real process. Returns CompletedProcess (text): the exit code, stdout and
    stderr as the process would have them (log lines included)."""
    args = pin_tiny(args) if pin_model else list(args)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv[:], os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    run_env = _run_env(env)  # from the test's environment, before it is replaced
    try:
        os.environ.clear()
        os.environ.update(run_env)
        os.chdir(cwd or ROOT)
        sys.argv = [str(ROOT / "run.py"), *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for h in root.handlers[:]:  # Hydra's job logging (console, run.log): closed, the test's own restored
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
    return subprocess.CompletedProcess([sys.executable, "run.py", *args], code, out.getvalue(), err.getvalue())


def vqx_cli_in_process(*args):
    """`vqx ARGS` (vqx.cli.main, the console script's entry) in this process; returns CompletedProcess (text)."""
    from vqx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["vqx", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture
def vqx_run():
    return run_vqx


@pytest.fixture
def vqx_run_in_process():
    return run_vqx_in_process


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """The cache_dir of every run in this test session that names none (VQX_CACHE_DIR, which cache_dir defaults to,
    for in-process runs and subprocesses alike): calibration captures, float-model statistics and 16-bit references
    are built once per session (per xdist worker) and read by later tests, and no test writes into the checkout's
    .vqx_cache or a cache the user's environment names. Tests of the cache itself pass their own cache_dir."""
    path = tmp_path_factory.mktemp("vqx_cache")
    saved = os.environ.get("VQX_CACHE_DIR")
    os.environ["VQX_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("VQX_CACHE_DIR", None)
    else:
        os.environ["VQX_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def tiny_t2v():
    from vqx.models.wan.tiny import build_tiny_pipeline

    return build_tiny_pipeline("t2v", seed=0)


class Tables(HTMLParser):
    """Rows of every <table id=...> in the report: {table id: [[cell text, ...], ...]}."""

    def __init__(self):
        super().__init__()
        self.tables, self.table, self.row = {}, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.table = self.tables.setdefault(dict(attrs).get("id"), [])
        elif tag == "tr" and self.table is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.row.append("")

    def handle_endtag(self, tag):
        if tag == "tr" and self.row is not None:
            self.table.append(self.row)
            self.row = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.row:
            self.row[-1] += data


def report_tables(path: Path) -> dict:
    parser = Tables()
    parser.feed(path.read_text())
    return parser.tables
