"""Small `vqx` subcommands that belong to no stage."""
