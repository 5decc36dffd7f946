import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pin_tiny(overrides):
    """``overrides`` plus model=wan_tiny unless they name a model: the suite tests the machinery on the random
    tiny Wan (fast); the default model (wan_mini) has its own tests."""
    overrides = list(overrides)
    if any(o.lstrip("+~").startswith("model=") for o in overrides):
        return overrides
    # next to the other overrides: argparse rejects positionals on both sides of a flag such as --cfg
    i = next((k for k, o in enumerate(overrides) if "=" in o and not o.startswith("-")), len(overrides))
    return [*overrides[:i], "model=wan_tiny", *overrides[i:]]


def run_vqx(args, cwd=None, env=None, timeout=300, pin_model=True):
    """Run `python run.py ARGS` as a user would (on wan_tiny unless ARGS name a model or ``pin_model`` is
    false); returns CompletedProcess (text)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("VQX_DEBUG", None)
    args = pin_tiny(args) if pin_model else list(args)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def vqx_run():
    return run_vqx


@pytest.fixture(scope="session")
def tiny_t2v():
    from vqx.models.wan.tiny import build_tiny_pipeline

    return build_tiny_pipeline("t2v", seed=0)
