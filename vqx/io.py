"""Atomic writes: a reader sees the old file or folder or the new one, never half of one.

Files: `atomic_path` (and `write_text_atomic`, `write_json_atomic`) write beside the target and rename.
Folders: `staged_dir` builds one in a hidden temporary folder beside its final place and `publish_dir` renames
it there; the on-disk cache, exports and wan_mini training all publish their folders this way.
What lands gets the permissions a plain ``open()`` / ``mkdir()`` would give under the process umask (0644 / 0755
with umask 0022), not the 0600 / 0700 the temporary files and folders are created with.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """What ``mkdir`` gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed onto ``target``.

    ``suffix``: the temporary name's (encoders pick a container by it); ``mode``: permissions to set before the
    rename (default: a plain new file's under the umask, `default_file_mode`; the temporary file is created 0600).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, default_file_mode() if mode is None else mode)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: str | os.PathLike, data: Any) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=str) + "\n")


# ---- folders -------------------------------------------------------------------------------------------------

def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def partial_prefix(final: Path) -> str:
    """How `staged_dir(final, owned=True)` names its temporary folders: ``.<name>.partial.<host>.<pid>.<random>``."""
    return f".{final.name}.partial."


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete owned temporary folders beside ``final`` left by killed processes on this host (their pid is gone)."""
    removed = []
    host = _host()
    if not final.parent.is_dir():
        return removed
    for p in final.parent.glob(partial_prefix(final) + "*"):
        parts = p.name[len(partial_prefix(final)):].split(".")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if not _pid_alive(int(parts[1])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def publish_dir(tmp: Path, final: Path, fsync_files: bool = False, mode: tuple[int, int] | None = None) -> None:
    """Rename the finished folder ``tmp`` onto ``final`` (beside it, so one file system). An existing ``final`` is
    renamed aside first and removed after: ``final`` is the old folder, briefly absent, or the new one, never a mix.

    ``fsync_files``: flush every file first (large outputs); ``mode``: (files, folders) permissions to set on
    everything first; default: a plain new file's and folder's under the umask (`default_file_mode`,
    `default_dir_mode`; executables keep their x bits as the umask allows): the temporary folder is created 0700
    and some writers (safetensors >= 0.7) create their files 0600 through temporary files of their own.
    """
    files, dirs = mode if mode is not None else (default_file_mode(), default_dir_mode())
    for p in [tmp, *tmp.rglob("*")]:
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(dirs)
        else:
            p.chmod(dirs if mode is None and p.stat().st_mode & 0o100 else files)
        if fsync_files and p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: str | os.PathLike, owned: bool = False, fsync_files: bool = False,
               mode: tuple[int, int] | None = None) -> Iterator[Path]:
    """Yield an empty hidden temporary folder beside ``final``; when the block succeeds it is published at ``final``
    (`publish_dir`), on any exception or interrupt it is removed and ``final`` is left as it was.

    ``owned``: name it after this host and process (`partial_prefix`) and first remove such folders of killed
    processes (`remove_stale_partials`); otherwise ``.<name>.<random>``, for callers that rebuild under a lock.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if owned:
        remove_stale_partials(final)
        prefix = f"{partial_prefix(final)}{_host()}.{os.getpid()}."
    else:
        prefix = f".{final.name}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
        publish_dir(tmp, final, fsync_files=fsync_files, mode=mode)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
