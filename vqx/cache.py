"""A content-addressed, locked, atomic on-disk cache shared by runs and sweep jobs.

An entry is a folder named by the sha256 of its identity (a JSON-able dict of everything that
determines the content). It is built in a temporary folder beside its final place, its files' hashes
are written to ``MANIFEST.json``, then the folder is renamed into place. A reader trusts an entry only
when its manifest exists and every file matches its hash, so a job killed mid-build leaves nothing
that is ever read; the next job rebuilds it. A file lock per entry makes concurrent jobs build it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from filelock import FileLock

from .io import staged_dir, write_json_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")
MANIFEST = "MANIFEST.json"


def identity_key(identity: dict) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DiskCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def entry_dir(self, kind: str, identity: dict) -> Path:
        key = identity_key({"kind": kind, **identity})
        return self.root / kind / key[:2] / key

    def is_complete(self, entry: Path) -> bool:
        manifest = entry / MANIFEST
        if not manifest.is_file():
            return False
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return False
        return all((entry / name).is_file() and file_sha256(entry / name) == digest for name, digest in files.items())

    def get_or_build(self, kind: str, identity: dict, build: Callable[[Path], None],
                     load: Callable[[Path], T]) -> tuple[T, bool]:
        """Load the entry for ``identity``, building it first if needed. Returns (value, cache_hit).

        ``build(tmp_dir)`` writes the entry's files into an empty folder; ``load(entry_dir)`` reads them.
        """
        entry = self.entry_dir(kind, identity)
        if self.is_complete(entry):
            return load(entry), True
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if self.is_complete(entry):  # another job built it while we waited
                return load(entry), True
            if entry.exists():  # a broken entry (killed build, tampered file): rebuild
                log.warning("cache entry %s is incomplete or corrupt; rebuilding it", entry)
                shutil.rmtree(entry)
            with staged_dir(entry) as tmp:
                build(tmp)
                files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                (tmp / "identity.json").write_text(json.dumps(identity, indent=2, sort_keys=True, default=str))
                files["identity.json"] = file_sha256(tmp / "identity.json")
                write_json_atomic(tmp / MANIFEST, {"kind": kind, "files": files})
        return load(entry), False

