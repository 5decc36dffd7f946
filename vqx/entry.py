"""The run's command line (``python run.py ARGS``, ``vqx run ARGS``): Hydra over the conf/ shipped in the package,
with the one-line error handling and, under torchrun, the ranks joined first."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from . import schemas  # noqa: F401  (every built-in schema; the stages, which import torch, come after the check)
from .app import one_line_hydra_errors, run_job
from .errors import UserError, report_and_exit
from .runtime import launched_distributed


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg: DictConfig):
    return run_job(cfg)  # the Optuna sweeper reads the objective from the return value


HELP_FLAGS = ("--help", "-h")


def help_page(overrides: list[str]) -> str:
    """``--help``: conf/config.yaml's ``hydra.help`` template with the groups as `vqx list` lists them (each option
    with what it is) and the config the overrides compose. Hydra's own page builds the same template but lists
    its 140 option groups first (1.5 s of an idle machine's time)."""
    import string

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .commands.list_options import SWEEPS, listing
    from .config.schema import GROUPS
    from .config.validate import reword_hydra_error
    from .runtime import package_path

    try:
        with initialize_config_dir(config_dir=str(package_path("conf")), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(reword_hydra_error(str(e))) from None
    template = cfg.hydra.help.template
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    groups = listing([*GROUPS, SWEEPS])
    return string.Template(template).substitute(APP_CONFIG_GROUPS=groups, CONFIG=OmegaConf.to_yaml(job), FLAGS_HELP="",
                                                HYDRA_CONFIG_GROUPS="")


def run_command_line() -> None:
    """One run or a multirun from sys.argv, as ``python run.py`` has always taken it."""
    args = sys.argv[1:]
    if any(a in HELP_FLAGS for a in args) and all(a in (*HELP_FLAGS, "-m", "--multirun") or not a.startswith("-")
                                                  for a in args):
        try:
            print(help_page([a for a in args if not a.startswith("-")]))
        except UserError as e:
            report_and_exit(e)
        return
    with one_line_hydra_errors():
        if launched_distributed():  # under torchrun: join the ranks, agree on the run dir
            from . import torchrun

            torchrun.prepare()
        try:
            hydra_main()
        except ValueError as e:  # Hydra's own flag checks (e.g. -m with --cfg) raise before its error reporting
            report_and_exit(UserError(str(e)))
    if launched_distributed():
        from . import distributed

        distributed.destroy()
