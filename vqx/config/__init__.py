"""The run configuration: schemas registered in Hydra's ConfigStore, and validation with clear errors."""
