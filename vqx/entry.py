"""The run's command line (``python run.py ARGS``, ``vqx run ARGS``): Hydra over the conf/ shipped in the package,
with the one-line error handling and, under torchrun, the ranks joined first."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from . import distributed, plugins, torchrun  # noqa: F401  (plugins registers schemas, algorithms, exporters, ...)
from .app import one_line_hydra_errors, run_job
from .errors import UserError, report_and_exit


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg: DictConfig):
    return run_job(cfg)  # the Optuna sweeper reads the objective from the return value


def run_command_line() -> None:
    """One run or a multirun from sys.argv, as ``python run.py`` has always taken it."""
    with one_line_hydra_errors():
        torchrun.prepare()  # under torchrun: join the ranks, agree on the run dir
        try:
            hydra_main()
        except ValueError as e:  # Hydra's own flag checks (e.g. -m with --cfg) raise before its error reporting
            report_and_exit(UserError(str(e)))
    distributed.destroy()
