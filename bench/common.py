"""Shared by the benchmark scripts: device facts, timing, memory peaks, result files."""

from __future__ import annotations

import datetime as dt
import logging
import platform
import resource
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


def environment() -> dict:
    return {"device": device_name(), "torch": torch.__version__, "date": dt.date.today().isoformat(),
            "python": platform.python_version()}


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


def peak_host_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def peak_gpu_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    from vqx.io import write_json_atomic

    path = RESULTS / name
    write_json_atomic(path, {"environment": environment(), **(extra or {}), "rows": rows})
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
