"""Errors that reach the user as one line, and the exit codes they map to.

`UserError` (exit 2): the input is wrong and the message says how to fix it.
`Fault` (exit 1): something broke while running (NaN activations, disk full, out of memory).
Anything else is a bug and is reported the same way, with the traceback only under VQX_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
import traceback


class VqxError(Exception):
    exit_code = 1


class UserError(VqxError):
    exit_code = 2


class Fault(VqxError):
    exit_code = 1


def debug_enabled() -> bool:
    return os.environ.get("VQX_DEBUG", "") not in ("", "0")


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def report_and_exit(exc: BaseException) -> "NoReturn":  # noqa: F821
    """Print `exc` as one line on stderr and exit with its code (2 user error, 1 fault)."""
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    code = getattr(exc, "exit_code", 1)
    if isinstance(exc, VqxError):
        text = one_line(str(exc))
    elif isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        text = ("out of memory: " + one_line(str(exc))[:300] + " -- reduce the work per step "
                "(calib.max_tokens, eval.height/width/num_frames) or enable model.offload_blocks=true")
    else:
        text = f"internal error ({type(exc).__name__}): {one_line(str(exc))[:500]} -- rerun with VQX_DEBUG=1 for the traceback"
    sys.stderr.write(f"vqx: error: {text}\n")
    sys.stderr.flush()
    sys.exit(code)
