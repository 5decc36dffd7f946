"""Experiment tracking and comparison: the W&B logger (`wandb_logger`, registered by vqx.plugins), job state
files (`runs`: error.json, resume) and `vqx compare` (`compare`, `report`). Kept import-free, so `vqx compare`
and the other subcommands never import wandb."""
