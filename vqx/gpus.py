"""One GPU per parallel sweep job on one machine: ``hydra/launcher=gpus`` (Hydra's joblib launcher plus the
`OneGpuPerJob` callback, conf/hydra/launcher/gpus.yaml).

Joblib runs jobs in worker processes that it reuses, handing each the next job as it frees up, so a job's
number does not tell which GPUs are busy (with job number modulo the GPU count, job 2 would share GPU 0 with a
still running job 0 whenever job 1 finishes first). Instead each worker process leases a GPU for its lifetime
through a file lock per GPU, which the OS releases when the process ends, and before CUDA starts in it shows its
jobs only that GPU (CUDA_VISIBLE_DEVICES), which they see as cuda:0. With more workers than GPUs, each GPU takes
the same number of them.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger("vqx")
WAIT_S = 5.0  # between tries while other jobs (another sweep) hold every GPU
_lease: tuple[str, FileLock] | None = None  # this process's GPU, held until it exits


def visible_gpus() -> list[str]:
    """The GPUs jobs may use: those CUDA_VISIBLE_DEVICES lists, else every GPU NVML counts. Counted without
    starting CUDA in this process (after that, CUDA_VISIBLE_DEVICES has no effect)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    try:
        count = torch.cuda._device_count_nvml()  # private, but stable since torch 2.0; -1 without NVML
    except Exception:  # noqa: BLE001
        count = -1
    if count < 0:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        count = sum(line.startswith("GPU ") for line in out.splitlines())
    return [str(i) for i in range(count)]


def gpu_count() -> int:
    """The default number of parallel jobs of ``hydra/launcher=gpus`` (at least one, for CPU-only machines)."""
    return max(1, len(visible_gpus()))


def lease_gpu(gpus: list[str], workers: int, lock_dir: Path) -> str:
    """This process's GPU: the first free slot of ``ceil(workers / len(gpus))`` per GPU, slot by slot so the
    GPUs fill evenly. A process keeps its GPU for all its jobs; it waits while other processes hold every slot."""
    global _lease
    if _lease is not None:
        return _lease[0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    slots = max(1, math.ceil(workers / len(gpus)))
    waited = False
    while True:
        for slot in range(slots):
            for gpu in gpus:
                lock = FileLock(str(lock_dir / f"gpu{gpu}.{slot}.lock"))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue
                _lease = (gpu, lock)
                return gpu
        if not waited:
            log.info("every GPU (%s) is taken by other jobs; waiting for one", ",".join(gpus))
            waited = True
        time.sleep(WAIT_S)


class OneGpuPerJob(Callback):
    """Hydra callback: before each job, give its worker process a GPU of its own (see the module docstring).
    Built in the launching process, so the GPU list and the worker count come from there."""

    def __init__(self, workers: int, lock_dir: str | None = None):
        self.gpus = visible_gpus()
        self.workers = workers
        # per machine and user: GPU ids are per machine; two sweeps of one user share the leases
        self.lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / f"vqx-gpu-leases-{os.getuid()}")

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if not self.gpus:
            log.info("job %s: no GPU visible, running on the CPU", config.hydra.job.num)
            return
        gpu = lease_gpu(self.gpus, self.workers, self.lock_dir)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("job %s: GPU %s (CUDA_VISIBLE_DEVICES=%s, worker pid %d)", config.hydra.job.num, gpu, gpu, os.getpid())


OmegaConf.register_new_resolver("vqx_gpu_count", gpu_count, replace=True)
