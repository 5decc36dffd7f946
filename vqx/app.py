"""The Hydra entry's error handling: every failure reaches the user as one line with a meaningful exit code."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from .errors import Interrupted, UserError, as_vqx_error, one_line, report_and_exit

log = logging.getLogger("vqx")


@dataclass(frozen=True)
class FailedJob:
    """What a failed sweep job returns (instead of raising, so the sweep goes on): the launcher hands it back to
    the sweep's process, which then exits non-zero (`exit_if_jobs_failed`)."""

    num: int
    run_dir: str
    error: str


def exit_if_jobs_failed(result) -> None:
    """After a multirun: if any job of the basic sweeper's batches (any launcher) returned `FailedJob`, print how
    many and the first one's error as one line and exit 1. (Optuna's failed trials return inf instead.)"""
    from hydra.core.utils import JobReturn, JobStatus

    if not isinstance(result, list):
        return
    jobs = [j for batch in result if isinstance(batch, (list, tuple)) for j in batch if isinstance(j, JobReturn)]
    failed = [j.return_value for j in jobs if j.status == JobStatus.COMPLETED and isinstance(j.return_value, FailedJob)]
    if failed:
        first = failed[0]
        sys.stderr.write(f"vqx: error: {len(failed)} of {len(jobs)} sweep jobs failed (job {first.num}, "
                         f"{first.run_dir}: {first.error}; each failed job's error.json says why)\n")
        sys.stderr.flush()
        sys.exit(1)


@contextmanager
def one_line_hydra_errors():
    """Reword Hydra's composition errors (unknown option, bad type, unknown key) as one line, exit 2.

    Hydra 1.3 prints them over several lines from ``hydra._internal.utils.run_and_report`` and exits 1;
    we wrap that function (the version is pinned to 1.3.x in pyproject.toml).
    """
    import hydra._internal.utils as hydra_utils
    from hydra.errors import CompactHydraException, HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config.validate import reword_hydra_error

    original = hydra_utils.run_and_report

    def run_and_report(func):
        try:
            result = func()
        except (CompactHydraException, HydraException, OmegaConfBaseException) as e:
            text = str(e)
            if e.__cause__ is not None and str(e.__cause__) not in text:
                text += "\n" + str(e.__cause__)
            report_and_exit(UserError(reword_hydra_error(text)))
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001  (anything else: one line, exit 1; Ctrl-C: 130)
            report_and_exit(e)
        exit_if_jobs_failed(result)  # a multirun's batches of job results; anything else passes through
        return result

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def run_job(cfg: DictConfig) -> dict | float | None:
    """Hydra task body. A single run exits non-zero on failure; in a multirun the failure is logged and
    the sweep goes on to its next job, and exits 1 when it has run them all (`FailedJob`). Either way the job's
    run dir gets ``error.json`` saying why.

    In a multirun a job whose run dir already holds a complete run of the same config is skipped
    (``resume=false`` reruns it). Under the Optuna sweeper the job returns the number named by
    ``objective`` (inf when the job failed, so the study goes on and avoids that region).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config.validate import apply_renames, check_settings
    from .runtime import launched_distributed
    from .track import runs

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if not multirun and not launched_distributed():
        # a bad value answers now, before torch and diffusers are imported (seconds on a busy machine); a sweep's
        # jobs and torchrun's ranks check it below, where a failure is the job's (error.json) or every rank's
        try:
            check_settings(cfg)
        except UserError as e:
            runs.discard_unused_run_dir(run_dir)
            report_and_exit(e)

    from . import distributed, experiment, plugins, torchrun  # noqa: F401  (plugins: the stages)
    from .track.run_log import log_failure

    torchrun.check_job(hc)
    optuna = multirun and "optuna" in str(hc.sweeper.get("_target_", "")).lower()
    # under torchrun a failed job stops every rank: the others cannot go on to the next job without it
    go_on = multirun and not distributed.is_distributed()
    checked = False  # past the checks that need no model (`experiment.prepare`)
    lock = None  # rank 0 holds the run dir for the run (`runs.RunDirLock`)
    try:
        apply_renames(cfg)  # old option names first, so a resumed sweep typed with them matches its saved config
        metrics = runs.completed_metrics(run_dir, cfg) if runs.resume_enabled(cfg) and multirun else None
        metrics = distributed.broadcast_object(metrics)  # all ranks skip, or none
        if metrics is not None:
            log.info("skipping completed job %s: %s holds a complete run of this config (resume=false reruns it)",
                     hc.job.num, run_dir)
        else:
            lock = runs.RunDirLock(run_dir) if distributed.is_main() else None
            prepared = experiment.prepare(cfg, run_dir)
            checked = True
            metrics = experiment.run(cfg, run_dir, prepared)
        if distributed.is_main():
            runs.clear_error(run_dir)
        if lock is not None:
            lock.release()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
        e = as_vqx_error(exc)  # out of memory, disk full: one line saying what to change, in error.json too
        if lock is not None:
            lock.release()
        if isinstance(e, runs.RunDirBusy):  # the dir is another live run's: leave everything in it alone
            report_and_exit(e)
        if not checked and not multirun and not isinstance(e, Interrupted):
            # a bad setting: the one line is the whole answer; no run dir of Hydra's files (a sweep keeps the
            # job's error.json: its report lists the failed jobs)
            if distributed.is_main():
                runs.discard_unused_run_dir(run_dir)
            report_and_exit(e)
        runs.write_error(run_dir, e)  # by whichever rank failed: it knows why
        log_failure(one_line(str(e)) or type(e).__name__)  # run.log ends with the error too
        if go_on and not isinstance(e, Interrupted):  # Ctrl-C stops the sweep too
            log.error("job %s failed: %s", hc.job.num, one_line(str(e)))
            sys.stderr.write(f"vqx: job {hc.job.num} ({run_dir}) failed: {one_line(str(e))}\n")
            return float("inf") if optuna else FailedJob(hc.job.num, str(run_dir), one_line(str(e)))
        report_and_exit(e)
    # outside the try: a missing objective is a sweep setting error, so Optuna stops with it
    return runs.objective_value(metrics, cfg.get("objective", "lpips")) if optuna else metrics
