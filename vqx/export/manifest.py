"""``manifest.json``: what an export folder holds and how it was made, written last.

Each file's sha256, size and tensor count, plus the format, algorithm, vqx version and the resolved run
config. A folder without a manifest is not a finished export; a file whose hash differs was changed or
truncated after the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .. import __version__
from ..cache import file_sha256
from ..io import write_json_atomic
from .folder import MANIFEST

MANIFEST_VERSION = 1


def resolved_config(cfg: DictConfig | None) -> dict | None:
    if cfg is None:
        return None
    return OmegaConf.to_container(cfg, resolve=True)


def write_manifest(folder: Path, kind: str, tensor_counts: dict[str, int], info: dict[str, Any],
                   cfg: DictConfig | None) -> dict:
    """Hash every file under ``folder`` (except the manifest) and write ``manifest.json`` last."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    files = {}
    for name in tqdm(names, desc="hash", unit="file", leave=False, disable=len(names) < 8):
        path = folder / name
        entry = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        if name in tensor_counts:
            entry["tensors"] = tensor_counts[name]
        files[name] = entry
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "kind": kind,
        "vqx_version": __version__,
        **info,
        "tensors": sum(tensor_counts.values()),
        "files": files,
        "run_config": resolved_config(cfg),
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> tuple[dict | None, list[str]]:
    """(manifest, problems). Problems are one line each."""
    path = folder / MANIFEST
    if not folder.is_dir():
        return None, [f"{folder} is not a folder"]
    if not path.is_file():
        return None, [f"{folder} has no {MANIFEST}: not a finished vqx export (an interrupted export never writes one)"]
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, UnicodeDecodeError) as e:
        return None, [f"{path} is not a valid manifest ({e})"]
    return manifest, []


def check_files(folder: Path, manifest: dict) -> list[str]:
    """Every listed file present with its size and hash; no file that the manifest does not list."""
    problems = []
    listed = manifest["files"]
    for name, entry in tqdm(sorted(listed.items()), desc="hash", unit="file", leave=False, disable=len(listed) < 8):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST} but missing")
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{name}: {size} bytes, manifest says {entry.get('bytes')} (truncated or replaced)")
        elif file_sha256(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from {MANIFEST} (the file changed after export)")
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != MANIFEST and p.relative_to(folder).as_posix() not in listed)
    for name in extra:
        problems.append(f"{name}: not listed in {MANIFEST} (lightx2v merges every *.safetensors of the folder)"
                        if name.endswith(".safetensors") else f"{name}: not listed in {MANIFEST}")
    return problems
