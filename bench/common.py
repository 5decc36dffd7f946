"""Shared by the benchmark scripts: device facts, timing, memory peaks, result files."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def command_line() -> str:
    """The command that is running, as typed from the repo root: `python bench/x.py --flag ...`."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else sys.argv[0]
    return shlex.join(["python", name, *sys.argv[1:]])


def git_state() -> dict | None:
    """The checkout's commit and whether tracked files differ from it; None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        return {"commit": head.stdout.strip(), "dirty": bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """What produced a results file: device, versions, date, the command line and the code's git state."""
    return {"device": device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": dt.date.today().isoformat(), "python": platform.python_version(),
            "triton": triton_version(), "command": command_line(), "git": git_state()}


def triton_version() -> str | None:
    """The Triton that is imported (it may differ from torch's pinned one): the fused kernels' speed depends on it."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def add_note_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--note: a sentence stored as the results file's ``note`` (what the numbers cannot say, e.g. that the GPU
    was shared). Results files are what the scripts write; a note comes in here, never by editing the JSON."""
    parser.add_argument("--note", default=None, help="a note stored in the results file (e.g. 'the GPU was shared')")
    return parser


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    def __enter__(self):
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.seconds = time.perf_counter() - self.t0


def median_ms(fn, warmup: int = 2, repeats: int = 5, cuda: bool | None = None) -> float:
    """Median ms of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones: CUDA events where ``cuda``
    (default: a GPU is there), else wall time."""
    import statistics

    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_host_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def peak_gpu_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def write_results(name: str | Path, rows, extra: dict | None = None, note: str | None = None) -> Path:
    """Every benchmark's results file: ``{"environment", "note", **extra, "rows"}`` at ``name`` (under
    bench/results/ unless absolute), written atomically."""
    from vqx.io import write_json_atomic

    path = Path(name)
    path = path if path.is_absolute() else RESULTS / path
    extra = dict(extra or {})
    if "note" in extra:  # scripts that pass their --note along with the other fields
        if note is not None:
            raise ValueError("write_results: a note given twice (note= and extra['note'])")
        note = extra.pop("note")
    clash = {"environment", "rows"} & set(extra)
    if clash:
        raise ValueError(f"write_results: extra may not hold {sorted(clash)}")
    write_json_atomic(path, {"environment": environment(), "note": note, **extra, "rows": rows})
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)
