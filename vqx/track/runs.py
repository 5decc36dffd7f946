"""What a job leaves in its run dir besides its results: why it failed (``error.json``), whether it is
already complete (resume), the number an Optuna sweep minimizes, and the lock that keeps a second run out of it."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError, one_line
from ..io import write_json_atomic

ERROR_FILE = "error.json"


def write_error(run_dir: Path, exc: BaseException) -> None:
    """Record why the job failed, for `vqx compare`; best effort (the job is failing already)."""
    message = one_line(str(exc)) or ("interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__)
    try:
        write_json_atomic(run_dir / ERROR_FILE, {"error": message, "type": type(exc).__name__})
    except OSError:
        pass


def clear_error(run_dir: Path) -> None:
    """A job that now succeeded must not keep a previous attempt's error.json."""
    (run_dir / ERROR_FILE).unlink(missing_ok=True)


HYDRA_FILES = {".hydra", "run.log"}  # what Hydra writes into a run dir before the job starts
LOCK_FILE = ".vqx.lock"


class RunDirBusy(UserError):
    """Another live run holds the run dir: this one must not write anything into it (not even error.json)."""


class RunDirLock:
    """An exclusive lock on a run dir for the run's lifetime (``flock``: the kernel drops it when the process ends,
    however it ends, so a killed run leaves no stale lock). ``release`` removes the lock file. Not filelock.FileLock
    (vqx.cache's): the holder's pid is written into the lock file for the refusal message, and a contender must open
    it without truncating it."""

    def __init__(self, run_dir: Path):
        import fcntl

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            holder = self.path.read_text().strip() or "another process"
            raise RunDirBusy(f"{run_dir} is in use by another vqx run ({holder}); wait for it to finish or give this "
                             "run another hydra.run.dir") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting run then locks a fresh file
            os.close(self.fd)
            self.fd = None


def discard_unused_run_dir(run_dir: Path) -> bool:
    """Remove ``run_dir`` if it holds nothing but what Hydra wrote for a job that never started (its ``.hydra/``
    and ``run.log``), and then its parents that are left empty inside the working directory (Hydra's
    ``outputs/<date>/``); a folder holding anything else (an earlier run's results) is left as it is."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - HYDRA_FILES:
        return False
    parents = _empty_parents_inside_cwd(run_dir)
    for handler in logging.getLogger().handlers:  # Hydra's run.log handler: close it before its file goes
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.absolute():
            logging.getLogger().removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    (run_dir / "run.log").unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        return False
    for parent in parents:
        try:
            parent.rmdir()  # only if empty: another run's folder keeps it
        except OSError:
            break
    return True


def _empty_parents_inside_cwd(run_dir: Path) -> list[Path]:
    """``run_dir``'s parents strictly inside the working directory, innermost first (never the cwd or above)."""
    cwd = Path.cwd().resolve()
    return [p for p in run_dir.resolve().parents if cwd in p.parents]


def resume_enabled(cfg: DictConfig) -> bool:
    value = cfg.get("resume", True)
    if not isinstance(value, bool):
        raise UserError(f"resume={value!r} is not valid; valid choices: true, false")
    return value


def completed_metrics(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The saved metrics when ``run_dir`` holds a complete run of exactly this resolved config, else None."""
    metrics_file, config_file = run_dir / "metrics.json", run_dir / "config.yaml"
    if not (metrics_file.is_file() and config_file.is_file()):
        return None
    try:
        metrics = json.loads(metrics_file.read_text())
        saved = yaml.safe_load(config_file.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None  # unreadable: run it again
    if not isinstance(metrics, dict) or metrics.get("status") != "complete":
        return None
    # compare as data, not text: a yaml dump's layout is not part of the config
    current = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    return metrics if saved == current else None


def lookup(metrics: dict, path: str) -> Any:
    """``metrics["a"]["b"]`` for path ``a.b``; None when absent."""
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def objective_value(metrics: dict, path: str) -> float:
    """The number an Optuna sweep minimizes; a config error (not a job failure) when missing."""
    value = lookup(metrics, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        numeric = sorted(_numeric_paths(metrics))
        raise UserError(f"objective={path} is not a number in this job's metrics.json (is the evaluator that "
                        f"reports it enabled?); numeric entries: {', '.join(numeric) or '(none)'}")
    return float(value)


def _numeric_paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("layers", "groups", "videos"):
                continue  # per-layer lists, not objectives
            out += _numeric_paths(value, f"{prefix}{key}.")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        out.append(prefix[:-1])
    return out
