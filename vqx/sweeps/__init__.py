"""Ready sweeps: +sweep=NAME (a package so Hydra finds them from any directory as pkg://vqx.sweeps)."""
