"""vqx's Hydra config groups (a package so Hydra finds them from any directory as pkg://vqx.conf)."""
