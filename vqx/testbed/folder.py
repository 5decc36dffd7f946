"""Where the trained wan_mini folder lives. Whether a folder is a complete one is checked by
vqx.models.wan.checkpoint (vqx loads it and imports nothing from the testbed)."""

from __future__ import annotations

from pathlib import Path


def repo_root() -> Path:
    """The vqx checkout (assets/ is not part of the wheel)."""
    import vqx

    return Path(vqx.__file__).resolve().parents[1]


def default_folder() -> Path:
    return repo_root() / "assets" / "wan_mini"
