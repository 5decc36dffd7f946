"""vqx: quantize a Wan2.1 pipeline, export it for lightx2v, score it. `python run.py --help` lists the groups."""

import hydra
from omegaconf import DictConfig

import vqx.plugins  # noqa: F401  (registers schemas, algorithms, exporters, evaluators, loggers)
from vqx import distributed, torchrun
from vqx.app import one_line_hydra_errors, run_job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    return run_job(cfg)  # the Optuna sweeper reads the objective from the return value


if __name__ == "__main__":
    with one_line_hydra_errors():
        torchrun.prepare()  # under torchrun: join the ranks, agree on the run dir
        main()
    distributed.destroy()
