"""Where an export goes, and how it gets there atomically.

An export is built in a hidden temporary folder beside its target (``.<name>.partial.<host>.<pid>.*``) and
renamed into place (`vqx.io.staged_dir`) only when every file, its manifest and (for lightx2v) its verification
are done. So the target either does not exist or is complete: a run killed mid-export leaves at most a hidden
partial folder (no ``manifest.json`` until the very end, and never at the target's name), which the next export
beside it removes once its process is gone.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from omegaconf import DictConfig

from ..errors import UserError
from ..io import staged_dir

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
DEFAULT_SUBDIR = "export"


@dataclass
class ExportFolderSchema:
    """Settings every exporter that writes a folder shares."""

    name: str = "none"
    dir: Optional[str] = None  # null: <run_dir>/export
    overwrite: bool = False  # replace an existing export at the target (only a folder vqx exported)


def hydra_run_dir() -> Path | None:
    """The run directory when called inside a Hydra job (``Exporter.check`` gets only the config)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001  (no Hydra context: the caller checks again at export time)
        return None
    return None


def target_dir(export_cfg: DictConfig, run_dir: Path | None) -> Path | None:
    if export_cfg.get("dir"):
        return Path(str(export_cfg.dir)).expanduser().absolute()
    return None if run_dir is None else (Path(run_dir) / DEFAULT_SUBDIR).absolute()


def same_config_export(target: Path | None, cfg: DictConfig | None) -> dict | None:
    """The manifest of an intact export at ``target`` made by this very run config, else None. A rerun of
    a killed job keeps such an export as it is (quantization is deterministic: it is what this run would
    write) instead of refusing or rewriting it."""
    from .manifest import check_files, read_manifest, resolved_config

    if target is None or cfg is None or not (target / MANIFEST).is_file():
        return None
    manifest, problems = read_manifest(target)
    if problems or manifest.get("run_config") != resolved_config(cfg) or check_files(target, manifest):
        return None
    return manifest


def kept_summary(target: Path, manifest: dict) -> dict:
    log.info("%s already holds this run config's intact export (a rerun of an unfinished job): kept as is", target)
    return {"kind": manifest.get("kind"), "dir": str(target), "kept": True, "files": len(manifest["files"]),
            "tensors": manifest.get("tensors"), "bytes": sum(f["bytes"] for f in manifest["files"].values())}


def check_target(target: Path | None, overwrite: bool, cfg: DictConfig | None = None) -> None:
    """Refuse, before any work, a target that exists unless it is a vqx export and overwrite is on, or it
    is the intact export of this same run config (see `same_config_export`)."""
    if target is None or not (target.exists() or target.is_symlink()):
        return
    if not overwrite and same_config_export(target, cfg) is not None:
        return
    if not overwrite:
        raise UserError(f"export folder {target} already exists; pass export.overwrite=true to replace it "
                        f"or export.dir=<another folder>")
    if not target.is_dir() or not (target / MANIFEST).is_file():
        raise UserError(f"export.overwrite=true would replace {target}, which is not a vqx export (no {MANIFEST}); "
                        f"choose another export.dir")


@contextmanager
def staged_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success rename it to ``target``.

    On any exception (or interrupt) the temporary folder is removed and ``target`` is left as it was.
    """
    check_target(target, overwrite)
    with staged_dir(target, owned=True, fsync_files=True) as tmp:
        yield tmp
        check_target(target, overwrite)  # again: another job may have written it meanwhile
