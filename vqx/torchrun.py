"""The Hydra app on several processes of one run (``torchrun --nproc-per-node N run.py ...``).

Every rank runs the same Hydra job; they must agree on its run dir, and only rank 0 may write Hydra's files
there (``.hydra/``, ``run.log``), as only rank 0 writes vqx's (see ``experiment``).
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime

from . import distributed
from .errors import UserError, report_and_exit


def prepare() -> None:
    """Before Hydra composes the config: join the process group and make every rank resolve ``${now:...}``
    (the default run and sweep dirs) to rank 0's launch time, so all compute the same dir even when they start
    in different seconds. A failure is one line, as everywhere else."""
    try:
        distributed.init()
    except Exception as e:  # noqa: BLE001 -- bad launch variables, unreachable MASTER_ADDR
        report_and_exit(e)
    if not distributed.is_distributed():
        return
    launched = distributed.broadcast_object(datetime.now() if distributed.is_main() else None)

    class LaunchTime(datetime):
        @classmethod
        def now(cls, tz=None):
            return launched

    import hydra.core.utils

    hydra.core.utils.datetime = LaunchTime  # Hydra's `now` resolver reads this module global (hydra 1.3.x, pinned)
    if not distributed.is_main():
        sys.argv.append("hydra.output_subdir=null")  # no second copy of .hydra/ (a later value wins in Hydra)


def check_job(hc) -> None:
    """Inside the job: refuse what cannot work with ranks, and keep rank > 0 out of run.log."""
    if distributed.launched_distributed() and not distributed.is_distributed():
        raise UserError("this job runs in a launcher's worker process under torchrun; with torchrun use the basic "
                        "launcher (one job after another on all GPUs), or hydra/launcher=gpus without torchrun")
    if not distributed.is_distributed():
        return
    if "optuna" in str(hc.sweeper.get("_target_", "")).lower():
        raise UserError("the Optuna sweeper cannot run under torchrun (each rank would run its own study); run it "
                        "without torchrun, e.g. with hydra/launcher=gpus for one GPU per trial")
    if not distributed.is_main():
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
