import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def run_vqx(args, cwd=None, env=None, timeout=300):
    """Run `python run.py ARGS` as a user would; returns CompletedProcess (text)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("VQX_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def vqx_run():
    return run_vqx


@pytest.fixture(scope="session")
def tiny_t2v():
    from vqx.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("t2v", seed=0)
