"""Errors that reach the user as one line, and the exit codes they map to.

`UserError` (exit 2): the input is wrong and the message says how to fix it.
`Fault` (exit 1): something broke while running (NaN activations, disk full, out of memory).
`Interrupted` (exit 130, the shell's code for Ctrl-C): the user stopped the run.
Anything else is a bug and is reported the same way, with the traceback only under VQX_DEBUG=1.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback


class VqxError(Exception):
    exit_code = 1


class UserError(VqxError):
    exit_code = 2


class Fault(VqxError):
    exit_code = 1


class Interrupted(VqxError):
    exit_code = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


INTERRUPTED = ("interrupted (Ctrl-C); the cache keeps every calibration capture, statistic and reference that was "
               "finished (each is written whole or not at all), so the same command goes on from there")


def debug_enabled() -> bool:
    return os.environ.get("VQX_DEBUG", "") not in ("", "0")


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def report_and_exit(exc: BaseException) -> "NoReturn":  # noqa: F821
    """Print `exc` as one line on stderr and exit with its code (2 user error, 1 fault)."""
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    exc = as_vqx_error(exc)
    code = getattr(exc, "exit_code", 1)
    if isinstance(exc, VqxError):
        text = one_line(str(exc))
    else:
        text = f"internal error ({type(exc).__name__}): {one_line(str(exc))[:500]} -- rerun with VQX_DEBUG=1 for the traceback"
    sys.stderr.write(f"vqx: error: {text}\n")
    sys.stderr.flush()
    sys.exit(code)


OOM_FIX = ("reduce the work per transformer call: fewer tokens (smaller calib.height/width/num_frames, eval.height/"
           "width/num_frames), calib.hessian_tokens and calib.loss_tokens, fewer calibration prompts (calib.num_prompts), "
           "eval.num_samples, or a GPU with more memory")
# disk full, quota, read-only or forbidden: the user's storage, not a bug; say which path
_STORAGE = {errno.ENOSPC: ("the disk is full", Fault), errno.EDQUOT: ("the disk quota is exceeded", Fault),
            errno.EFBIG: ("the file size limit (ulimit -f) is exceeded", Fault),
            errno.EROFS: ("the file system is read-only", UserError), errno.EACCES: ("permission is denied", UserError),
            errno.EPERM: ("the operation is not permitted", UserError),
            errno.ENOTDIR: ("a part of the path is a file, not a folder", UserError)}


def as_vqx_error(exc: BaseException) -> BaseException:
    """Map the failures users cause or can fix -- out of memory, storage full or unwritable -- to one-line
    VqxErrors that say what to change; anything else is returned as is."""
    if isinstance(exc, VqxError):
        return exc
    if _interrupted(exc):
        return _chained(Interrupted(INTERRUPTED), exc)
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        where = "GPU" if "cuda" in (type(exc).__name__ + text).lower() else "host"
        return _chained(Fault(f"out of {where} memory ({one_line(text)[:160]}); {OOM_FIX}"), exc)
    storage = storage_error(exc)
    if storage is not None:
        return storage
    return exc


def _interrupted(exc: BaseException | None) -> bool:
    """A Ctrl-C, or an error raised while one was being handled (C code that was interrupted mid-way can turn the
    KeyboardInterrupt into an error of its own, e.g. torch's "could not determine the shape of object type")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def storage_error(exc: BaseException, path: str | os.PathLike | None = None) -> VqxError | None:
    """A one-line error naming ``path`` when ``exc`` is a storage failure (an OSError with a storage errno, or a
    library error quoting "(os error N)" as safetensors' Rust writer does), else None."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (m := re.search(r"\(os error (\d+)\)", str(exc))):
        code = int(m.group(1))
    if code not in _STORAGE:
        return None
    what, cls = _STORAGE[code]
    path = path or getattr(exc, "filename", None) or "a file under the run dir, cache_dir or export.dir"
    fix = ("free space there, or point hydra.run.dir / cache_dir (VQX_CACHE_DIR) / export.dir at another disk"
           if cls is Fault else "make it writable, or point hydra.run.dir / cache_dir (VQX_CACHE_DIR) / export.dir elsewhere")
    verb = "access" if code in (errno.EACCES, errno.EPERM, errno.ENOTDIR) else "write"  # these two also happen on reads
    return _chained(cls(f"cannot {verb} {path}: {what}; {fix}"), exc)


def _chained(new: VqxError, cause: BaseException) -> VqxError:
    new.__cause__ = cause  # VQX_DEBUG=1 still shows where it happened
    return new
