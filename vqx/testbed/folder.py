"""Where the trained wan_mini folder lives. Whether a folder is a complete one is checked by
vqx.models.wan.checkpoint (vqx loads it and imports nothing from the testbed)."""

from __future__ import annotations

from pathlib import Path

from ..runtime import package_path


def default_folder() -> Path:
    return package_path("assets/wan_mini")
