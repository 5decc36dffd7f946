"""Where the trained wan_mini folder lives. Whether a folder is a complete one is checked by
vqx.models.wan.checkpoint (vqx loads it and imports nothing from the testbed)."""

from __future__ import annotations

from pathlib import Path

from ..runtime import repo_path


def default_folder() -> Path:
    return repo_path("assets/wan_mini")
