"""The process group of a run launched on several GPUs (torchrun, or anything that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT): one process per GPU, each on cuda:LOCAL_RANK.

Without those variables (a plain ``python run.py``) every helper acts for a world of one process, so callers
use them unconditionally. Collectives of CUDA tensors go through NCCL, everything else (CPU tensors, pickled
objects, barriers) through gloo.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError
from .runtime import launched_distributed

T = TypeVar("T")
# Only rank 0 exports; the others wait for it at their next collective. A dead rank makes torchrun stop all
# of them at once, so this only bounds a true hang.
TIMEOUT = timedelta(minutes=60)


def init() -> None:
    """Join the process group the environment describes; nothing for a single process. Idempotent."""
    if dist.is_initialized() or not launched_distributed():
        return
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {var} is not set; launch several processes "
                            "with torchrun --nproc-per-node N run.py ..., or unset WORLD_SIZE for one process")
    backend = "gloo"
    if torch.cuda.is_available():
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count and count != 1:
            raise UserError(f"LOCAL_RANK={local} but only {count} GPUs are visible; start at most {count} processes "
                            "per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local if count > 1 else 0)  # one visible GPU (Slurm binding): it is this rank's
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> list[int]:
    """This rank's items of ``range(n)``: i % world == rank. Fixed by the index alone, so every item (a
    prompt, an eval sample) is processed exactly as a single process would, with its own seed."""
    return list(range(rank(), n, world_size()))


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (the others pass anything, e.g. None)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def scatter_object(per_rank: list[T] | None) -> T:
    """Rank 0 passes one object per rank; each rank gets its own."""
    if not is_distributed():
        return per_rank[0]
    out: list[Any] = [None]
    dist.scatter_object_list(out, per_rank if is_main() else None, src=0)
    return out[0]


def all_reduce_(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """In place: the elementwise ``"max"`` or ``"sum"`` over ranks, the same bits on every rank."""
    if is_distributed():
        dist.all_reduce(tensor, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
